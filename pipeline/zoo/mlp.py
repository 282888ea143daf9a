"""A plain MLP as a list of {"w", "b"} dicts (tanh between layers), in the default float dtype
(float64 when the job's solver.dtype is, which enables x64 before the model is built)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def mlp_init(key, sizes):
    """Layers ``sizes[0] -> ... -> sizes[-1]``: normal weights scaled by 1/sqrt(fan-in), zero biases.

    Args:
        key: a PRNG key.
        sizes: layer widths, input first.

    Returns:
        A list of {"w": (n_in, n_out), "b": (n_out,)} dicts.
    """
    dtype = jnp.result_type(float)
    layers = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes)):
        layers.append({"w": (jax.random.normal(k, (n_in, n_out), dtype) / np.sqrt(n_in)).astype(dtype),
                       "b": jnp.zeros((n_out,), dtype)})
    return layers


def mlp(layers, x):
    """The network's output at ``x`` (tanh hidden layers, linear last layer)."""
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]
