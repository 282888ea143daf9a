"""Delayed gradient model: dx/dt = g(f(x(t)), ∇f(x(t - τ))) with g(u, v) = -v / (1 + u²), f an
MLP, τ learned; history φ(t) = x0 + t v with the slope v learned."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pipeline
from pipeline.zoo.mlp import mlp, mlp_init


def make_model(hidden=(32, 32), tau_init=1.0):
    """The delayed gradient model for a state of size 2.

    Args:
        hidden: widths of f's hidden layers.
        tau_init: the delay's initial value.

    Returns:
        A ``pipeline.Model`` (DDE, one delay, a learned history).
    """
    sizes = [2, *hidden, 1]
    dtype = jnp.result_type(float)

    def init(key):
        return {"f": mlp_init(key, sizes), "tau": jnp.asarray(tau_init, dtype), "v": jnp.zeros((2,), dtype)}

    def rhs(t, x, lagged, params):
        f = lambda z: mlp(params["f"], z)[0]
        u, v = f(x), jax.grad(f)(lagged[0])
        return -v / (1.0 + u**2)

    return pipeline.Model(init=init, rhs=rhs, delays=lambda params: jnp.reshape(params["tau"], (1,)),
                          history=lambda t, params, x0: x0 + t * params["v"])
