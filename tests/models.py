"""The neural delayed gradient flow used by the agreement tests: rhs contains jax.grad of an MLP."""

import jax
import jax.numpy as jnp

import solvers as sv


def mlp(params, x):
    (w1, b1), (w2, b2) = params
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


def init(seed=0, hidden=8):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = [(jax.random.normal(k1, (2, hidden)) / 1.5, jax.random.normal(k2, (hidden,)) * 0.1),
              (jax.random.normal(k3, (hidden, 1)) / 3.0, jnp.zeros((1,)))]
    return {"V": params, "tau": jnp.asarray(0.7), "h0": jnp.array([0.8, -0.4]), "h1": jnp.array([0.3, 0.2]),
            "x0": jnp.array([1.0, -0.2])}


def delayed_gradient_flow(T=3.0):
    """x'(t) = -∇V_θ(x(t - τ)) - 0.3 x(t); history h0 + t h1; x(0) = x0 (a jump: x0 != h0)."""
    def rhs(t, x, lagged, p):
        grad_v = jax.grad(lambda z: jnp.sum(mlp(p["V"], z)))(lagged[0])
        return -grad_v - 0.3 * x

    return sv.DDEProblem(rhs, lambda t, p: p["h0"] + t * p["h1"], lambda p: jnp.stack([p["tau"]]), 0.0, T,
                         x0=lambda p: p["x0"])


OBS = jnp.array([0.4, 1.1, 1.9, 2.6, 3.0])


def loss(ys):
    return 0.5 * jnp.sum(ys**2) + jnp.sum(jnp.sin(ys[:, 0]))
