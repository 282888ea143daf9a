"""InterpolatingAdjoint's checkpoints (where they sit, the forward solve that keeps them, the
segment-by-segment sweep that re-solves from them) and the forward-solution oracle every
continuous adjoint's sweep reads x(t) and the delayed values from."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _forward, _history
from .._breakpoints import breakpoint_times
from .._problem import DDEProblem
from .._setup import build, delays_of, initial_state, lagged_values, solve_delays


class ForwardSolution:
    """Forward-solution oracle for the backward sweep: x(t) and the delayed values at t,
    read from a history buffer of dense output (values before t0 from the history)."""

    def __init__(self, prob, t0, hist, like, shift):
        self.prob, self.t0, self.hist, self.like, self.shift = prob, t0, hist, like, shift
        self.is_dde = isinstance(prob, DDEProblem)

    def x(self, t, left, p):
        value = _history.lookup(self.hist, t, left)
        if self.is_dde:
            before = ~_history.before(self.t0, t, left, _history.side_tolerance(t, self.t0))  # t <= t0 (left)
            value = jnp.where(before, jnp.asarray(self.prob.history(t, p), self.like.dtype), value)
        return value

    def lags(self, t, left, p):
        if not self.is_dde:
            return None
        taus = delays_of(self.prob, p, self.like.dtype, "off") + self.shift  # checked once in _backward
        return lagged_values(self.prob, p, taus, self.t0, self.hist, t, left, self.like)


def checkpointed_forward(run, state, targets, max_delay, opts, is_dde):
    """The forward solve segment by segment, keeping the loop state at each checkpoint (without
    its history buffer); a DDE's history goes to the checkpoints' windows (_history.Windows)
    instead. The final history buffer is kept too: it still holds the last steps.

    A checkpoint is the end of the first step at or after its target time, not a stop of its
    own, so the solve takes the steps it takes without checkpoints (a stop per checkpoint
    changed them: on refcase A_jump, RK4 steps of dt0 = 0.4 were cut at 16 checkpoints and the
    value under jax.grad differed from the plain solve's by 3.5e-5). Two targets within one step give
    an empty segment. Returns (final state, residuals, checkpoint times)."""
    n = targets.shape[0] - 1
    windows = None
    if is_dde:  # checkpoint 0's window stays empty: the solve starts without steps
        windows = _history.empty_windows(n, opts.history_size, opts.tableau.degree, state.y)
    light = lambda st: st._replace(hist=None)

    def segment(carry, i):  # segment i, then checkpoint i + 1's window (none after the last)
        st, windows = carry
        start, st = light(st), run(st, targets[i + 1])
        if is_dde:  # i is the scan's counter, never batched: a real branch under vmap too
            windows = jax.lax.cond(i + 1 < n, lambda w: _history.save_window(w, i + 1, st.hist, st.t - max_delay),
                                   lambda w: w, windows)
        return (st, windows), start

    # one scan over every segment: the forward step is compiled once (see sweep_segments)
    (final, windows), states = jax.lax.scan(segment, (state, windows), jnp.arange(n))
    if is_dde:
        final = final._replace(status=jnp.where(windows.ok | (final.status != _forward.OK), final.status,
                                                _forward.WINDOWS_FULL))
    times = jnp.concatenate([states.t, targets[n:]])  # where each segment starts, and t1
    return final, (states, windows, final.hist), times


def checkpoint_targets(prob, p, saveat, opts, sens):
    """t0, N - 1 interior checkpoint targets, t1 (each checkpoint is the first forward step end at
    or after its target, see checkpointed_forward). Each interior one is the uniform time
    t0 + i(t1 - t0)/N moved to the nearest time both sweeps land on anyway (an observation,
    or a forward breakpoint of a DDE) when one lies within half a segment: a checkpoint
    elsewhere costs the backward sweep a step of its own where its segment is re-solved."""
    dtype = initial_state(prob, p).dtype
    t0, t1 = jnp.asarray(prob.t0, dtype), jnp.asarray(prob.t1, dtype)
    n = sens.checkpoints
    uniform = t0 + (t1 - t0) * jnp.linspace(0.0, 1.0, n + 1, dtype=dtype)
    landed = [saveat.astype(dtype)]
    if isinstance(prob, DDEProblem) and opts.track_breakpoints:
        landed.append(breakpoint_times(t0, solve_delays(prob, p, dtype, opts, "off")[0],
                                       opts.tableau.order + 1))  # build checks
    landed = jax.lax.stop_gradient(jnp.concatenate(landed))
    landed = jnp.where((landed > t0) & (landed < t1), landed, jnp.inf)
    inner = uniform[1:-1]
    dist = jnp.abs(landed[None, :] - inner[:, None])
    near = landed[jnp.argmin(dist, axis=1)]
    inner = jnp.where(jnp.min(dist, axis=1) <= 0.5 * (t1 - t0) / n, near, inner)
    return jnp.concatenate([t0[None], inner, t1[None]])


def first_held_segment(ring, checkpoint_times, taus, t0):
    """The first of the last segments that the forward's final history buffer still holds, with
    (for a DDE) the max τ before each: they are swept straight from it, the earlier ones re-solved."""
    max_tau = 0.0 if taus is None else jax.lax.stop_gradient(jnp.max(taus))
    reach = jnp.maximum(checkpoint_times[:-1] - max_tau, t0)  # what segment i's sweep reads
    held = (ring.count > 0) & (ring.t_start[ring.first] <= reach)  # true for segments first_held, ...
    return checkpoint_times.shape[0] - 1 - jnp.sum(held.astype(jnp.int32))


def sweep_segments(prob, p, saveat, opts, checkpoints, checkpoint_times, first_held, start, sweep, y0, taus,
                   shift):
    """Backward over the segments in reverse. The last segments, those whose steps (and, for a
    DDE, the last max τ before them) the forward's final history buffer still holds, are swept
    straight from it: all of them when the solve took at most history_size steps. Each earlier
    segment is re-solved from its checkpoint (for a DDE, from its window) to the next one, into
    one buffer that every segment reuses. first_held: first_held_segment's answer, which _backward
    also needs for the sweep's stops. start(fwd): the sweep's initial state; sweep(state, fwd,
    s_to): the sweep run on to s_to.

    Both parts run in one loop, so that the sweep's step (the largest part of the gradient's
    program) is compiled once: its first pass sweeps the held segments, each later one the
    segment it has just re-solved."""
    states, windows, ring = checkpoints
    is_dde = taus is not None
    built = build(prob, p, saveat, opts, keep_all=not is_dde)  # the forward's stops: it re-takes its steps
    cfg = opts.loop_config()
    max_tau = built.rhs.max_delay  # 0 for an ODE
    ok = jnp.asarray(_forward.OK, jnp.int32)

    def resolve(i, work, held):
        c_i = checkpoint_times[i]
        ck = jax.tree_util.tree_map(lambda a: a[i], states)
        c_next = jnp.where(held, ck.t, checkpoint_times[i + 1])  # the held pass: an empty segment, no steps
        if is_dde:
            rhs = built.rhs._replace(keep_from=c_i - max_tau)
            hist = _history.load_window(work, windows, i, skip=held)
        else:
            rhs, hist = built.rhs, work._replace(first=jnp.zeros_like(work.first), count=jnp.zeros_like(work.count))
        fin = _forward.run(cfg, rhs, ck._replace(hist=hist), c_next, saveat, built.stops, built.stop_is_bp,
                           built.rtol, built.atol, opts.dt0)
        return fin.hist, fin.status

    def segment(j, carry):  # pass j ends at checkpoint first_held - j
        state_b, work, status = carry
        i, held = first_held - j, j == 0
        # a select, not a lax.cond: under vmap the pass count is per trajectory, so held is
        # batched, and a batched cond would copy the weights its branch closes over to every
        # trajectory (test_vmap_never_copies_the_weights_per_trajectory)
        hist, st = resolve(i, work, held)
        hist = jax.tree_util.tree_map(lambda a, b: jnp.where(held, a, b), ring, hist)
        st = jnp.where(held, ok, st)
        state_b = sweep(state_b, ForwardSolution(prob, built.t0, hist, y0, shift), -checkpoint_times[i])
        return state_b, hist, jnp.maximum(status, st)

    state_b = start(ForwardSolution(prob, built.t0, ring, y0, shift))
    state_b, _, status = jax.lax.fori_loop(0, first_held + 1, segment, (state_b, ring, ok))
    return state_b._replace(status=jnp.where(status != _forward.OK, status, state_b.status))
