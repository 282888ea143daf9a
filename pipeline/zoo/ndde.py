"""Neural DDE: dx/dt = MLP_θ([x(t), x(t - τ)]), τ learned; history: the constant x0."""

from __future__ import annotations

import jax.numpy as jnp

import pipeline
from pipeline.zoo.mlp import mlp, mlp_init


def make_model(hidden=(32, 32), tau_init=1.0):
    """The neural DDE for a scalar state.

    Args:
        hidden: widths of the MLP's hidden layers.
        tau_init: the delay's initial value.

    Returns:
        A ``pipeline.Model`` (DDE, one delay).
    """
    sizes = [2, *hidden, 1]
    return pipeline.Model(
        init=lambda key: {"f": mlp_init(key, sizes), "tau": jnp.asarray(tau_init, jnp.result_type(float))},
        rhs=lambda t, x, lagged, params: mlp(params["f"], jnp.concatenate([x, lagged[0]])),
        delays=lambda params: jnp.reshape(params["tau"], (1,)))
