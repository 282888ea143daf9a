"""Dense output of accepted steps in a fixed-capacity ring buffer, and delayed lookups.

Each slot holds one accepted step [t_a, t_b] as polynomial coefficients in θ = (t - t_a)/h:
coeffs[0] = y(t_a), coeffs[p] for θ^p (see _tableau.ButcherTableau.dense). Only the last
max τ is ever read, so when the buffer is full the oldest step is overwritten if no future
lookup can reach it; otherwise the solve stops with "history buffer full".
"""

from __future__ import annotations

from typing import NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from ._precision import HIGHEST


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


def _ring(i, cap: int):
    """The slot of ring position i >= 0: one integer remainder (jnp's ``%`` adds a sign
    correction, about ten operations in every lookup and so in every compiled program)."""
    i = jnp.asarray(i)
    return jax.lax.rem(i, jnp.asarray(cap, i.dtype))


def push(hist: History, t_a, t_b, coeffs, oldest_needed, write):
    """Store one step when ``write`` (the step was accepted); touches one slot only.

    Returns (history, ok); ok is False when the buffer is full and its oldest step still
    ends at or after ``oldest_needed`` (a future lookup may read it)."""
    cap = hist.t_start.shape[0]
    full = hist.count >= cap
    ok = ~write | ~full | (hist.t_end[hist.first] < oldest_needed)
    slot = jnp.where(full, hist.first, _ring(hist.first + hist.count, cap))
    keep = lambda new, old: jnp.where(write, new, old)
    new = History(
        t_start=hist.t_start.at[slot].set(keep(t_a, hist.t_start[slot])),
        t_end=hist.t_end.at[slot].set(keep(t_b, hist.t_end[slot])),
        # a rejected step goes to the spare last row: the update never reads the buffer, so XLA
        # updates it in place instead of copying it every step
        coeffs=eqxi.buffer_at_set(hist.coeffs, jnp.where(write, slot, cap), coeffs),
        first=jnp.where(write & full, _ring(hist.first + 1, cap), hist.first),
        count=jnp.where(write & ~full, hist.count + 1, hist.count),
    )
    return new, ok


class Windows(NamedTuple):
    """What InterpolatingAdjoint's checkpoints keep of a DDE's history: for checkpoint i, the
    steps a re-solve from it can read (those ending after c_i - max τ), as rows start[i]:stop[i]
    of one time-ordered log that holds each step once, however many windows share it."""

    log: History  # first stays 0; count = rows used
    start: jax.Array  # (n,)
    stop: jax.Array  # (n,)
    ok: jax.Array  # False once a window did not fit in the log


def empty_windows(n: int, capacity: int, degree: int, y0: jax.Array) -> Windows:
    hist = empty(capacity, degree, y0)
    rows = jnp.zeros((n,), jnp.int32)
    return Windows(hist._replace(coeffs=hist.coeffs[:-1]), rows, rows, jnp.asarray(True))


def save_window(w: Windows, i, hist: History, oldest_needed) -> Windows:
    """Record checkpoint i's window of ``hist`` (taken at the checkpoint), appending to the log
    only the steps it does not hold yet: the newer ones, copied row by row."""
    cap, log = hist.t_start.shape[0], w.log
    logged_until = jnp.where(log.count > 0, log.t_end[jnp.maximum(log.count - 1, 0)], -jnp.inf)
    new_from = jnp.maximum(_steps_before(hist, oldest_needed, True), _steps_before(hist, logged_until, False))
    fits = log.count + hist.count - new_from <= log.t_start.shape[0]

    body = lambda k, log: _copy_step(log, log.count + k - new_from, hist, _ring(hist.first + k, cap))
    end = jnp.where(fits, hist.count, new_from)
    log = _rows_loop(new_from, end, body, log)
    log = log._replace(count=log.count + end - new_from)
    start = _steps_before(log, oldest_needed, True)
    return Windows(log, w.start.at[i].set(start), w.stop.at[i].set(log.count), w.ok & fits)


def _copy_step(dst: History, row, src: History, slot) -> History:
    """dst with row ``row`` set to src's stored step ``slot``."""
    return dst._replace(t_start=dst.t_start.at[row].set(src.t_start[slot]),
                        t_end=dst.t_end.at[row].set(src.t_end[slot]),
                        coeffs=dst.coeffs.at[row].set(src.coeffs[slot]))


def _rows_loop(lo, hi, body, hist):
    """fori_loop over k in [lo, hi) whose body writes rows of a History's arrays (as buffers:
    under vmap a finished trajectory's writes are skipped row by row, not selected whole)."""
    buffers = lambda c: (c[1].t_start, c[1].t_end, c[1].coeffs)
    return eqxi.while_loop(lambda c: c[0] < hi, lambda c: (c[0] + 1, body(c[0], c[1])), (lo, hist), kind="lax",
                           buffers=buffers)[1]


def load_window(work: History, w: Windows, i, skip=False) -> History:
    """Checkpoint i's window as a History that reuses ``work``'s buffer (only the window's rows
    are written; the rest of ``work`` is stale and never read). skip (traced): write no rows."""
    start, n = w.start[i], jnp.where(skip, 0, w.stop[i] - w.start[i])

    work = _rows_loop(0, n, lambda k, work: _copy_step(work, k, w.log, start + k), work)
    return work._replace(first=jnp.zeros((), jnp.int32), count=n)


def horner(coeffs, theta):
    """y0 + Σ_p coeffs[p] θ^p for coeffs of shape (degree + 1, *shape)."""
    acc = coeffs[-1]
    for p in range(coeffs.shape[0] - 2, -1, -1):
        acc = coeffs[p] + theta * acc
    return acc


SIDE_ULPS = 4


def side_tolerance(*times):
    """How far apart (SIDE_ULPS ulps of the largest |time|) a lookup time and a boundary may lie
    and still count as one point when a side is chosen. A breakpoint's image t - τ_j and the
    boundary it stands for (a stored step end, t0, the sweep's start) are different sums of the
    same delays and differ by an ulp or so: read exactly, that ulp put a stage on the wrong side
    of the jump at t0 (DESIGN.md, Breakpoints)."""
    mag = jnp.abs(times[0])
    for t in times[1:]:
        mag = jnp.maximum(mag, jnp.abs(t))
    return SIDE_ULPS * jnp.finfo(mag.dtype).eps * mag


def reads_left(theta: float) -> bool:
    """The side a lookup at fraction θ of a step reads at a boundary: left from the middle on.
    A stage near the step's start reads what follows the start's image, a stage near its end what
    precedes the end's image, so between two breakpoints only 2·side_tolerance apart every stage
    still reads the side of both images its time lies on (the first stage, θ = 0, reads right;
    the delays are moved apart twice that, see _breakpoints.SEPARATION)."""
    return theta >= 0.5


def before(a, q, left, tol=0.0):
    """a < q for a left-sided lookup, a <= q otherwise, where a within ``tol`` of q counts as q;
    ``left`` a Python bool or a traced one (a step's batched lookups and the parameter
    quadrature's records carry it as data)."""
    if isinstance(left, bool):
        return (a < q - tol) if left else (a <= q + tol)
    # One comparison per element (a may be a whole buffer): a <= x as a < the next float above x;
    # above 0 that is the smallest normal float, as XLA flushes subnormals to zero (0 <= 0 failed).
    q = jnp.asarray(q)
    q, tol = jax.lax.stop_gradient((q, jnp.asarray(tol, q.dtype)))  # a comparison: no derivative
    x = q + tol
    above = jnp.where(x == 0, jnp.finfo(q.dtype).tiny, jnp.nextafter(x, jnp.asarray(jnp.inf, q.dtype)))
    return a < jnp.where(left, q - tol, above)


def _newest_end(hist: History):
    cap = hist.t_end.shape[0]
    return hist.t_end[_ring(hist.first + jnp.maximum(hist.count - 1, 0), cap)]


def _steps_before(hist: History, q, left: bool, tol=0.0):
    """Number of stored steps that end before q (strictly for left lookups; ends within ``tol``
    of q count as q).

    A count over the whole buffer rather than a binary search: a reduction stays one
    materialised scalar, whereas XLA fused the search's scalar chain into the elementwise
    consumers of the looked-up slot and redid it for every state component (the DDE forward
    ran 2x slower at power-of-two capacities)."""
    cap = hist.t_end.shape[0]
    if cap > SEARCH_ABOVE:
        return _search_before(hist, q, left, tol)
    stored = _ring(jnp.arange(cap, dtype=hist.first.dtype) + (cap - hist.first), cap) < hist.count
    return jnp.sum(stored & before(hist.t_end, q, left, tol), dtype=jnp.int32)


SEARCH_ABOVE = 1024


def _search_before(hist: History, q, left, tol):
    """_steps_before by bisection over the stored steps in time order (log2 capacity reads)."""
    cap = hist.t_end.shape[0]

    def halve(_, lo_hi):
        lo, hi = lo_hi  # the answer lies in [lo, hi]
        mid = (lo + hi) // 2
        go_right = (mid < hist.count) & before(hist.t_end[_ring(hist.first + mid, cap)], q, left, tol)
        return jnp.where(go_right, mid + 1, lo), jnp.where(go_right, hi, mid)

    lo, _ = jax.lax.fori_loop(0, int(np.ceil(np.log2(cap + 1))), halve, (jnp.zeros((), jnp.int32), hist.count))
    return lo


def lookup(hist: History, q, left: bool):
    """Interpolate the stored solution at q (which must lie within the stored steps).

    ``left`` picks the step to the left of q when q is a step boundary; a stage reads the side
    ``reads_left`` gives for its node, so a step never mixes the two sides of a jump.
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
    return jnp.tensordot(weights, coeffs[1:], axes=1, precision=HIGHEST)


def _piece(hist: History, q, left: bool):
    """Coefficients of the stored step holding q, θ in it, and its length. A q within
    side_tolerance of a step boundary counts as that boundary (θ then lies off [0, 1] by ulps)."""
    cap = hist.t_end.shape[0]
    tol = side_tolerance(q, _newest_end(hist))
    i = jnp.clip(_steps_before(hist, q, left, tol), 0, jnp.maximum(hist.count - 1, 0))
    slot = _ring(hist.first + i, cap)
    t_a, t_b = hist.t_start[slot], hist.t_end[slot]
    return hist.coeffs[slot], (q - t_a) / (t_b - t_a), t_b - t_a
