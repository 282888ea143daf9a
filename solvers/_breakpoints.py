"""Where the solver must land: discontinuity propagation points and observation times.

x loses one order of smoothness at each t0 + Σ n_j τ_j (DESIGN.md, Breakpoints). A
jump in x itself (x0 != history(t0)) at level 0 becomes a jump in x^(k) at level k, so
an order-p method must land on every level 1..p+1; beyond that the solution is smooth
enough for the method. Delays may be traced (learned): the times are computed as an
array of static length, sorted, and the solver clips each step to the next one, so a
step that ends on a breakpoint keeps its dependence on τ.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np


def multi_indices(m: int, max_level: int) -> np.ndarray:
    """All n in N^m with 1 <= |n| <= max_level, as an int array (count, m)."""
    out = [n for n in itertools.product(range(max_level + 1), repeat=m) if 1 <= sum(n) <= max_level]
    return np.asarray(out, dtype=np.int64).reshape(-1, m)


def breakpoint_times(t0, delays, max_level: int):
    """o + n·τ for every origin o in t0 (a scalar or 1-D array) and multi-index n with
    1 <= |n| <= max_level (unsorted, flattened)."""
    n = multi_indices(delays.shape[0], max_level)
    shifts = jnp.asarray(n, delays.dtype) @ delays
    return jnp.reshape(jnp.reshape(jnp.asarray(t0, delays.dtype), (-1, 1)) + shifts[None, :], (-1,))


def _inside(breakpoints, t0, t1, dtype):
    """The breakpoints in (t0, t1); the others pushed to +inf (shapes stay static)."""
    return jnp.where((breakpoints > t0) & (breakpoints < t1), breakpoints.astype(dtype), jnp.asarray(jnp.inf, dtype))


def saves_off_breakpoints(saveat, breakpoints, t0, t1):
    """saveat with every time closer than eps^(2/3) max(|t0|, |t1|) to a breakpoint in (t0, t1)
    pushed to +inf, so that it is no stop of its own.

    Landing on both would leave a step a few ulps long between them, one end fixed and one
    moving with τ, and second derivatives through such a step lose every digit (the seed
    example's Hessian-vector product was off by 0.5% with a save time 1 ulp from 5τ, 1e-6 at
    1000 ulps). The loop reads such a save time from the step that passes it instead: the one
    ending on the breakpoint when it lies before it, the next one when it lies after.
    """
    tol = jnp.finfo(saveat.dtype).eps ** (2 / 3) * jnp.maximum(jnp.abs(t0), jnp.abs(t1)).astype(saveat.dtype)
    bps = _inside(breakpoints, t0, t1, saveat.dtype)
    near = jnp.any(jnp.abs(saveat[:, None] - bps[None, :]) <= tol, axis=1)
    return jnp.where(near, jnp.asarray(jnp.inf, saveat.dtype), saveat)


def stop_times(t0, t1, saveat, breakpoints):
    """Sorted times to land on, each flagged as a breakpoint or not, ending with +inf.

    Breakpoints outside (t0, t1) are dropped by pushing them to +inf (shapes stay static).
    """
    dtype = saveat.dtype
    inf = jnp.asarray(jnp.inf, dtype)
    bps = jnp.zeros((0,), dtype) if breakpoints is None else _inside(breakpoints, t0, t1, dtype)
    times = jnp.concatenate([bps, saveat, jnp.reshape(t1, (1,)).astype(dtype), inf[None]])
    is_bp = jnp.concatenate([jnp.ones(bps.shape, bool), jnp.zeros(saveat.shape[0] + 2, bool)])
    order = jnp.argsort(times, stable=True)
    return times[order], is_bp[order]
