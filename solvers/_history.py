"""Dense output of accepted steps in a fixed-capacity ring buffer, and delayed lookups.

Each slot holds one accepted step [t_a, t_b] as polynomial coefficients in θ = (t - t_a)/h:
coeffs[0] = y(t_a), coeffs[p] for θ^p (see _tableau.ButcherTableau.dense). Only the last
max τ is ever read, so when the buffer is full the oldest step is overwritten if no future
lookup can reach it; otherwise the solve stops with "history buffer full".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class History(NamedTuple):
    t_start: jax.Array  # (cap,)
    t_end: jax.Array  # (cap,)
    coeffs: jax.Array  # (cap + 1, degree + 1, *shape): the last row takes rejected steps (never read)
    first: jax.Array  # slot of the oldest stored step
    count: jax.Array  # number of stored steps


def empty(capacity: int, degree: int, y0: jax.Array) -> History:
    dtype = y0.dtype
    return History(
        # unused slots hold a harmless unit interval: lookups never select them, but their
        # arithmetic must stay finite so reverse-mode never meets 0 * NaN.
        t_start=jnp.zeros((capacity,), dtype),
        t_end=jnp.ones((capacity,), dtype),
        coeffs=jnp.zeros((capacity + 1, degree + 1) + y0.shape, dtype),
        first=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def push(hist: History, t_a, t_b, coeffs, oldest_needed, write):
    """Store one step when ``write`` (the step was accepted); touches one slot only.

    Returns (history, ok); ok is False when the buffer is full and its oldest step still
    ends at or after ``oldest_needed`` (a future lookup may read it)."""
    cap = hist.t_start.shape[0]
    full = hist.count >= cap
    ok = ~write | ~full | (hist.t_end[hist.first] < oldest_needed)
    slot = jnp.where(full, hist.first, (hist.first + hist.count) % cap)
    keep = lambda new, old: jnp.where(write, new, old)
    new = History(
        t_start=hist.t_start.at[slot].set(keep(t_a, hist.t_start[slot])),
        t_end=hist.t_end.at[slot].set(keep(t_b, hist.t_end[slot])),
        # a rejected step goes to the spare last row: the update never reads the buffer, so XLA
        # updates it in place instead of copying it every step
        coeffs=lax.dynamic_update_index_in_dim(hist.coeffs, coeffs, jnp.where(write, slot, cap), 0),
        first=jnp.where(write & full, (hist.first + 1) % cap, hist.first),
        count=jnp.where(write & ~full, hist.count + 1, hist.count),
    )
    return new, ok


def extend(hist: History, later: History, t_from, t_to, oldest_needed):
    """Append the steps of ``later`` that start in [t_from, t_to), in order (``hist`` must end
    at t_from). Returns (history, ok) as ``push``."""
    cap = later.t_start.shape[0]

    def body(k, carry):
        out, ok = carry
        slot = (later.first + k) % cap
        t_a = later.t_start[slot]
        out, ok_k = push(out, t_a, later.t_end[slot], later.coeffs[slot], oldest_needed, (t_a >= t_from) & (t_a < t_to))
        return out, ok & ok_k

    return lax.fori_loop(0, later.count, body, (hist, jnp.asarray(True)))


def horner(coeffs, theta):
    """y0 + Σ_p coeffs[p] θ^p for coeffs of shape (degree + 1, *shape)."""
    acc = coeffs[-1]
    for p in range(coeffs.shape[0] - 2, -1, -1):
        acc = coeffs[p] + theta * acc
    return acc


def _steps_before(hist: History, q, left: bool):
    """Number of stored steps that end before q (strictly for left lookups)."""
    cap = hist.t_end.shape[0]
    lo = jnp.zeros((), jnp.int32)
    hi = hist.count
    for _ in range(max(1, cap.bit_length())):
        mid = (lo + hi) // 2
        t_mid = hist.t_end[(hist.first + mid) % cap]
        right = (t_mid < q) if left else (t_mid <= q)
        active = lo < hi
        lo = jnp.where(active & right, mid + 1, lo)
        hi = jnp.where(active & ~right, mid, hi)
    return lo


def lookup(hist: History, q, left: bool):
    """Interpolate the stored solution at q (which must lie within the stored steps).

    ``left`` picks the step to the left of q when q is a step boundary; a stage at the
    start of a step (c = 0) reads right-sided values, all later stages left-sided ones,
    so a step never mixes the two sides of a jump.
    """
    coeffs, theta, _ = _piece(hist, q, left)
    return horner(coeffs, theta)


def lookup_derivative(hist: History, q, left: bool):
    """d/dq of the stored solution at q (the derivative of the step's polynomial)."""
    coeffs, theta, h = _piece(hist, q, left)
    return slope(coeffs, theta) / h


def slope(coeffs, theta):
    """d/dθ of horner(coeffs, θ). A contraction with the weights p θ^(p-1), not Horner's rule:
    XLA then reads a stored slot once instead of fusing the read into every consumer (which made
    it copy the whole history buffer each step to keep the buffer's update in place)."""
    weights = jnp.stack([jnp.asarray(p * theta ** (p - 1), coeffs.dtype) for p in range(1, coeffs.shape[0])])
    return jnp.tensordot(weights, coeffs[1:], axes=1)


def _piece(hist: History, q, left: bool):
    """Coefficients of the stored step holding q, θ in it, and its length."""
    cap = hist.t_end.shape[0]
    i = jnp.clip(_steps_before(hist, q, left), 0, jnp.maximum(hist.count - 1, 0))
    slot = (hist.first + i) % cap
    t_a, t_b = hist.t_start[slot], hist.t_end[slot]
    return hist.coeffs[slot], (q - t_a) / (t_b - t_a), t_b - t_a
