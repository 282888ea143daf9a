"""Hamiltonian neural network (an ODE): dx/dt = J ∇H_θ(x), H an MLP, x = (q, p); the rhs is a
``GradientField``, whose adjoint takes its vector-Jacobian products by GradientField's default
``adjoint_vjp = "reverse-over-reverse"`` ("forward-over-reverse" is the other choice)."""

from __future__ import annotations

import jax.numpy as jnp

import pipeline
import solvers as sv
from pipeline.zoo.mlp import mlp, mlp_init


def make_model(hidden=(32, 32)):
    """The HNN for a state of size 2.

    Args:
        hidden: widths of H's hidden layers.

    Returns:
        A ``pipeline.Model`` (ODE).
    """
    sizes = [2, *hidden, 1]
    return pipeline.Model(init=lambda key: {"H": mlp_init(key, sizes)},
                          rhs=sv.GradientField(lambda x, params: jnp.sum(mlp(params["H"], x)),
                                               sv.canonical_hamiltonian_j(2)))
