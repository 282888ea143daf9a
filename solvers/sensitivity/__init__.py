"""Sensitivity methods: how ``jax.grad`` of a loss of ``solve(...).ys`` is computed."""

from ._objects import (AbstractSensitivity, BacksolveAdjoint, Backprop, ForwardMode, InterpolatingAdjoint,
                       QuadratureAdjoint, default_sensitivity)

__all__ = ["AbstractSensitivity", "Backprop", "ForwardMode", "BacksolveAdjoint", "InterpolatingAdjoint",
           "QuadratureAdjoint", "default_sensitivity"]
