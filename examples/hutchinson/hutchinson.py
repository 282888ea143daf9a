"""Hutchinson's delayed logistic equation x' = r x (1 - x(t - tau) / K) as a trainable
pipeline.Model: r, K and the delay tau are learned (the module of issue 38, as written there)."""

import jax.numpy as jnp

import pipeline


def make_model(r0=0.5):
    return pipeline.Model(
        init=lambda key: {"r": jnp.asarray(r0), "K": jnp.asarray(1.0), "tau": jnp.asarray(0.5)},
        rhs=lambda t, x, lagged, params: params["r"] * x * (1 - lagged[0] / params["K"]),
        delays=lambda params: jnp.stack([params["tau"]]),   # omit (None) for an ODE model: rhs(t, x, params)
        history=None,   # optional history(t, params, x0); default: the constant x0
    )
