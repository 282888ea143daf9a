"""The derivative along one fixed direction of the parameters, for the step control.

A differentiated solve must resolve the derivative, not only the solution: where the
solution is a polynomial the method integrates exactly (f_x = 0 and a constant history
make x a polynomial of degree k on the k-th delay interval), the solution's error estimate
is zero, the controller takes steps of τ, and the tangents (one degree higher) or the
adjoint's ∫ f_pᵀλ are not resolved at any tolerance. Controlling every derivative would
cost one tangent per parameter; the step control instead sees the derivative along one
direction v, fixed and dense (every entry nonzero, so no parameter is left out, and a
cancellation between entries' errors is a coincidence of measure zero):

* a DDE's discrete methods (Backprop, ForwardMode) take the steps of a recording solve
  that integrates, beside x, its tangent s = (∂x/∂p) v (``tangent_problem_parts``);
* the continuous adjoints' backward sweep integrates, beside λ, the scalar ∫ λᵀ (f_p v).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import _history
from ._forward import Rhs
from ._setup import delays_of, initial_state, lagged_values

_KEY = 37  # the direction is the same in every program: vmapped and looped sweeps take the same steps


def direction(n: int, dtype):
    """The fixed direction in a flat parameter vector of n entries: standard normal entries
    drawn from one fixed key (the same vector in every program of the same n and dtype)."""
    return jax.random.normal(jax.random.PRNGKey(_KEY), (n,), dtype) if n else jnp.zeros((0,), dtype)


def tangent_problem_parts(prob, p, built, opts):
    """(rhs, Y0, hist0) of the recording solve for the discrete methods: the state Y stacks x
    and its tangent s = (∂x/∂p) v; the step control norms both. p's floating-point leaves are
    the parameters; the delays' dependence on p enters through the dense output's slope, the
    history's through history(t, p), exactly as jax.jvp sees the discrete solve."""
    floats, others = eqx.partition(p, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(floats)
    v = direction(flat.size, flat.dtype if flat.size else built.y0.dtype)
    params = lambda pf: eqx.combine(unravel(pf), others)
    dtype, t0 = built.y0.dtype, built.t0
    shift = built.taus - jax.lax.stop_gradient(delays_of(prob, p, dtype, "off"))

    x0, s0 = jax.jvp(lambda pf: initial_state(prob, params(pf)), (flat,), (v,))
    Y0 = jnp.stack([x0, s0.astype(dtype)])

    def evaluate(hist, t, Y, left):
        def f(coeffs, x, pf):
            q = params(pf)
            taus = delays_of(prob, q, dtype, "off") + shift
            lags = lagged_values(prob, q, taus, t0, hist._replace(coeffs=coeffs), t, left, x)
            return prob.rhs(t, x, lags, q)

        dx, ds = jax.jvp(f, (hist.coeffs[:, :, 0], Y[0], flat), (hist.coeffs[:, :, 1], Y[1], v))
        return jnp.stack([dx.astype(dtype), ds.astype(dtype)])

    rhs = Rhs(eval=evaluate, cap=built.rhs.cap, max_delay=built.rhs.max_delay, keep_from=built.rhs.keep_from)
    return rhs, Y0, _history.empty(built.hist0.t_start.shape[0], opts.tableau.degree, Y0)
