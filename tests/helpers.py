"""Problems used by several test modules."""

import jax.numpy as jnp

import solvers as sv


def linear_dde(T=3.5):
    """x'(t) = a x(t) + b x(t - tau), history c, x(0) = x0: refcases A_jump / A_cont."""
    rhs = lambda t, x, lag, p: p["a"] * x + p["b"] * lag[0]
    return sv.DDEProblem(rhs, lambda t, p: p["c"] * jnp.ones_like(t), lambda p: jnp.stack([p["tau"]]),
                         0.0, T, x0=lambda p: p["x0"])


def refcase_params(case):
    return {k: jnp.asarray(v, jnp.float64) for k, v in case["params"].items()}


def pendulum(m_k_q0=None):
    H = lambda x, p: x[1] ** 2 / (2 * p["m"]) + p["k"] * (1 - jnp.cos(x[0]))
    field = sv.GradientField(H, sv.canonical_hamiltonian_j(2))
    return sv.ODEProblem(field, lambda p: jnp.stack([p["q0"], jnp.zeros_like(p["q0"])]), 0.0, 10.0)
