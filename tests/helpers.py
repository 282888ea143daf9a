"""Problems, method lists and assertions used by several test modules."""

import jax
import jax.numpy as jnp

import solvers as sv

DDE_METHODS = [sv.Backprop(), sv.ForwardMode(), sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()]
ODE_METHODS = DDE_METHODS + [sv.BacksolveAdjoint()]


def ids(sensitivity):
    return repr(sensitivity)


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


def assert_close(got, exact, rel=1e-6, name=""):
    for k, v in exact.items():
        assert abs(float(got[k]) - v) <= rel * abs(v), (name, k, float(got[k]), v)


def assert_hvp_matches_differences(L, p, eps):
    """H v of L at p (v_k = 0.1 (k + 1)) against central differences of the gradient along v,
    both from one jitted program (gradient, H v), to 1e-6 absolute."""
    v = {k: jnp.asarray(0.1 * (i + 1)) for i, k in enumerate(p)}
    grad_and_hvp = jax.jit(lambda p: jax.jvp(jax.grad(L), (p,), (v,)))
    hv = grad_and_hvp(p)[1]
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * eps * b, p, v)
    gp, gm = grad_and_hvp(shift(1))[0], grad_and_hvp(shift(-1))[0]
    for k in p:
        assert abs(float(hv[k]) - float((gp[k] - gm[k]) / (2 * eps))) < 1e-6, k
