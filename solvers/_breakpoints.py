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

import jax
import jax.numpy as jnp
import numpy as np

from ._precision import HIGHEST


def multi_indices(m: int, max_level: int) -> np.ndarray:
    """All n in N^m with 1 <= |n| <= max_level, as an int array (count, m)."""
    out = [n for n in itertools.product(range(max_level + 1), repeat=m) if 1 <= sum(n) <= max_level]
    return np.asarray(out, dtype=np.int64).reshape(-1, m)


def breakpoint_times(t0, delays, max_level: int):
    """o + n·τ for every origin o in t0 (a scalar or 1-D array) and multi-index n with
    1 <= |n| <= max_level (unsorted, flattened)."""
    n = multi_indices(delays.shape[0], max_level)
    shifts = jnp.matmul(jnp.asarray(n, delays.dtype), delays, precision=HIGHEST)
    return jnp.reshape(jnp.reshape(jnp.asarray(t0, delays.dtype), (-1, 1)) + shifts[None, :], (-1,))


def _inside(breakpoints, t0, t1, dtype):
    """The breakpoints in (t0, t1); the others pushed to +inf (shapes stay static)."""
    return jnp.where((breakpoints > t0) & (breakpoints < t1), breakpoints.astype(dtype), jnp.asarray(jnp.inf, dtype))


SIZES = (0.5, 1, 2, 4, 8, 16, 32)  # shift sizes tried, in units of the separation, smallest first
# breakpoints apart by this many side tolerances (see separating_shift): stage sides ask for 2,
# twice that for a margin. (In float32 at 4 a Backprop τ-gradient was once off by 2.5e-3, t0 = 0.37,
# τ = (0.3, 0.1): a step capped at τ_min stopped an ulp short of a breakpoint, which _forward.run
# now lands on; 18 random commensurate float32 configurations are within 1.7e-5 at 4.)
SEPARATION = 4.0
SEPARATION_F64 = 1600.0


def _shift_directions(m: int) -> np.ndarray:
    """16 directions of m delays, random weights in ±[1, 2) fixed per m: (16, m)."""
    rng = np.random.default_rng(m)
    return rng.uniform(1.0, 2.0, (16, m)) * rng.choice([-1.0, 1.0], (16, m))


def _min_gaps(taus, shifts, t0, t1, n):
    """For each row of shifts, the smallest distance between two breakpoints t0 + n·(τ + shift)
    in (t0, t1) (+inf when fewer than two lie there)."""
    dtype = taus.dtype
    bps = jnp.asarray(t0, dtype) + jnp.matmul(taus[None, :] + shifts, n.T, precision=HIGHEST)  # (rows, breakpoints)
    bps = jnp.sort(_inside(bps, t0, t1, dtype), axis=1)
    gaps = jnp.where(jnp.isfinite(bps[:, 1:]), bps[:, 1:] - bps[:, :-1], jnp.inf)
    return jnp.min(gaps, axis=1)


def separating_shift(taus, t0, t1, max_level: int, side_tol):
    """The shift of the delays after which no two breakpoints of levels <= max_level in (t0, t1)
    lie closer than the separation (SEPARATION side_tol, SEPARATION_F64 side_tol in float64):
    zero when none does (always for one delay), else the one of least relative size max_j
    |shift_j| / τ_j among 32 directions (16 fixed ones, and the same scaled by τ_j / max τ) at the
    smallest of SIZES where one does; the sizes are tried in turn and the search stops there. No
    delay moves by more than 2^-10 of itself: where that does not suffice (float32, delays far
    below t1), the best separation within it.

    Commensurate delays (τ1 = 2τ2, or two equal ones) put breakpoints of different origin on one
    float, and a landing there moves with only one of them: the gradient then missed the other's
    motion (dL/dτ1 -0.050 for -0.147 on a two-delay problem). Breakpoints a few ulps apart leave
    a step of a few ulps, whose stages read the history on the wrong side of a jump. Moving the
    delays apart gives each breakpoint its own landing, with room between two of them for every
    stage to clear the lookups' rounding allowance side_tol on the side it does not read
    (_history.reads_left: at least half the step away), with a margin (see SEPARATION). The shift
    is 1e-11 of the delays for τ = (0.2, 0.1) on [0, 2] (float64; 2.5e-10 for four commensurate
    delays; 1.3e-5 to 3.3e-4 in float32); values change by as much as the delays do; it carries no
    derivative (DESIGN.md, Breakpoints)."""
    m = taus.shape[0]
    if m == 1:
        return jnp.zeros_like(taus)
    dtype = taus.dtype
    taus = jax.lax.stop_gradient(taus)  # the search is a loop: no derivative goes through it
    # in float64 400x wider: second derivatives through the step between two breakpoints lose
    # digits as ulp / gap (a τ Hessian-vector product for equal delays off by 2e-3 at 4 side_tol,
    # 1.6e-4 at 50, 3e-6 at 1600)
    sep = side_tol * (SEPARATION_F64 if dtype == jnp.float64 else SEPARATION)
    n = jnp.asarray(multi_indices(m, max_level), dtype)
    dirs = jnp.asarray(_shift_directions(m), dtype)
    dirs = jnp.concatenate([dirs, dirs * (taus / jnp.max(taus))[None, :]]) * sep  # (32, m)
    cap = taus * 2.0**-10
    zero = jnp.zeros_like(taus)

    def try_size(carry):
        i, _, best, best_gap = carry
        shifts = dirs * jnp.asarray(SIZES, dtype)[i]
        gaps = _min_gaps(taus, shifts, t0, t1, n)
        small = jnp.all(jnp.abs(shifts) <= cap[None, :], axis=1)
        ok = small & (gaps >= sep)
        rel = jnp.max(jnp.abs(shifts) / taus[None, :], axis=1)
        pick = jnp.argmin(jnp.where(ok, rel, jnp.inf))
        widest = jnp.argmax(jnp.where(small, gaps, -jnp.inf))
        better = small[widest] & (gaps[widest] > best_gap)  # the fallback: widest within the cap so far
        found = jnp.any(ok)
        best = jnp.where(found, shifts[pick], jnp.where(better, shifts[widest], best))
        return i + 1, found, best, jnp.where(better, gaps[widest], best_gap)

    gap0 = _min_gaps(taus, zero[None, :], t0, t1, n)[0]
    start = (jnp.zeros((), jnp.int32), gap0 >= sep, zero, gap0)
    _, _, best, _ = jax.lax.while_loop(lambda c: ~c[1] & (c[0] < len(SIZES)), try_size, start)
    return best


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
