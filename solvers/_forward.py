"""The forward integration loop (a while loop) shared by ODEs and DDEs.

Each iteration attempts one step from t: it is clipped to the next stop (breakpoint,
save time or t1) and, for a DDE, capped at the smallest delay, so that every delayed
lookup of the step reads already accepted dense output (the documented alternative to
fixed-point iteration on the current step). Step sizes chosen by the controller carry no
derivative; a step that ends on a stop has size ``stop - t`` and keeps its dependence on
the stop (hence on learned delays).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from . import _history
from ._controller import error_norm, initial_step
from ._reverse_loop import stored_while_loop
from ._step import rk_step
from ._tableau import ButcherTableau

OK, MAX_STEPS, UNDERFLOW, NONFINITE, HISTORY_FULL, WINDOWS_FULL = range(6)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    tableau: ButcherTableau
    controller: Any
    max_steps: int
    history_size: int
    land_on_saveat: bool = True


class LoopState(NamedTuple):
    t: jax.Array
    y: jax.Array
    k1: jax.Array
    h: jax.Array
    prev_err: jax.Array
    last_rejected: jax.Array
    nonfinite: jax.Array
    ys: jax.Array
    save_idx: jax.Array
    hist: Any  # _history.History for a DDE, None for an ODE
    acc: Any  # quadrature accumulator (see Rhs.quadrature), or None
    probes: Any  # state recorded on landing at each probe time (before any impulse), or None
    accepted: jax.Array
    rejected: jax.Array
    rhs_evals: jax.Array
    status: jax.Array
    k1_left: Any = None  # k1 was evaluated with left-sided lookups (FSAL's k_last), for Rhs.param_part
    overflowed: Any = None  # a rejected attempt Backprop differentiates had a non-finite stage (_solve.backprop_checks)
    decisions: Any = None  # Decisions being recorded (see record_decisions), or None


class Decisions(NamedTuple):
    """Every step attempt's choices, by attempt number: the controller's step (before landing),
    whether it landed on its stop, whether it was accepted. A loop that replays them takes the
    recorded steps whatever its own error estimates say."""

    h_try: jax.Array  # (max_steps,)
    land: jax.Array  # (max_steps,) bool
    accept: jax.Array  # (max_steps,) bool


def record_decisions(state: LoopState, max_steps: int) -> LoopState:
    """state, set to record each attempt's Decisions as the loop runs."""
    dtype = state.y.dtype
    return state._replace(decisions=Decisions(jnp.zeros((max_steps,), dtype), jnp.zeros((max_steps,), bool),
                                              jnp.zeros((max_steps,), bool)))


class Rhs(NamedTuple):
    """How to evaluate the right-hand side given the loop state's history."""

    eval: Callable  # eval(hist, t, y, left) -> dy; eval(hist, t, y, left, looked) with ``lookups``
    cap: Any  # largest step allowed (smallest delay, or +inf)
    max_delay: Any  # how far back lookups reach (0 for an ODE)
    keep_from: Any = None  # never evict steps ending at or after this time (None: +inf)
    hist_part: tuple[int, int] | None = None  # the history stores y[a:b] of a 1-D state (dense output: y[:b])
    quadrature: Callable | None = None  # quadrature(t_a, t_b, coeffs) -> increment of LoopState.acc
    n_state: int | None = None  # y[n_state:] is a pure integral of eval's output (see _step.rk_step), never saved
    # with n_state: boundaries in y between parts whose errors are normed apart (default (n_state,):
    # the state, then the integrals); a step is accepted when every part is within the tolerance
    err_groups: tuple = ()
    # param_part(s, z, left, w) -> increment of LoopState.acc: Σ_r w_r g(s_r, z_r, left_r) over records
    # (stage times, stage states, lookup sides, h·b_i of accepted steps, 0 otherwise), taken every
    # PARAM_CHUNK iterations instead of integrating g at every stage (see _run_chunked)
    param_part: Callable | None = None
    param_nodes: tuple | None = None  # (θ_k, w_k): records at θ_k of each step's dense output, not its stages
    uncontrolled_from: int | None = None  # with n_state: y[uncontrolled_from:] is outside the step control
    # lookups(hist, t, left) -> looked: what eval reads of the stored history at t, handed back as
    # eval(..., looked); a step reads it for all its later stages at once (see _step.rk_step)
    lookups: Callable | None = None


PARAM_CHUNK = 8


def init_state(cfg: LoopConfig, rhs: Rhs, y0, t0, t1, saveat, rtol, atol, dt0, hist0, acc0=None,
               probe_shape=None) -> LoopState:
    """The loop state at t0: first stage, first step size, and the save at t0 if asked."""
    tab = cfg.tableau
    dtype = y0.dtype
    k1 = rhs.eval(hist0, t0, y0, False)
    evals = 1
    if dt0 is None:
        h0 = initial_step(k1, y0, t0, t1 - t0, tab.order, rtol, atol, rhs.cap,
                          lambda t, y: rhs.eval(hist0, t, y, True))
        evals += 1
    else:
        h0 = jnp.asarray(dt0, dtype)
    at_t0 = saveat[0] == t0
    # + (saveat[0] - t0) x'(t0): zero, but a save time on t0 gets the derivative x'(t0⁺) that
    # every later save time gets from its step (its value alone carried none: dL/dts[0] was 0)
    saved = y0 + (saveat[0] - t0).astype(dtype) * k1
    saved = saved if rhs.n_state is None else saved[:rhs.n_state]
    ys = jnp.zeros((saveat.shape[0],) + saved.shape, dtype)
    ys = ys.at[0].set(jnp.where(at_t0, saved, ys[0]))
    return LoopState(
        t=t0, y=y0, k1=k1, h=lax.stop_gradient(h0), prev_err=cfg.controller.init_state(dtype),
        last_rejected=jnp.asarray(False), nonfinite=jnp.asarray(False), ys=ys,
        save_idx=at_t0.astype(jnp.int32), hist=hist0, acc=acc0,
        probes=None if probe_shape is None else jnp.zeros(probe_shape, dtype), accepted=jnp.zeros((), jnp.int32),
        rejected=jnp.zeros((), jnp.int32), rhs_evals=jnp.asarray(evals, jnp.int32),
        status=jnp.asarray(OK, jnp.int32), k1_left=jnp.asarray(False), overflowed=jnp.asarray(False))


def run(cfg: LoopConfig, rhs: Rhs, state: LoopState, t1, saveat, stops, stop_is_bp, rtol, atol, dt0,
        kind="lax", checkpoints=None, impulses=None, probe_times=None, probe_fn=None, save_window=False,
        replay: Decisions | None = None) -> LoopState:
    """Step from ``state`` until t1 (or an error status).

    kind: "lax" (forward-mode differentiable), "checkpointed" (reverse-mode, equinox's
    online-checkpointed loop) or "stored" (reverse-mode, _reverse_loop; a DDE's loop falls back
    to "checkpointed"). impulses: optional (len(saveat), *shape) added to the state
    right after it is saved at each save time (the adjoint's jumps at observations); the
    first stage is then recomputed. probe_times: record, on landing exactly at each,
    ``probe_fn(hist, t, y)`` (default: y before any impulse) into LoopState.probes.
    save_window: with land_on_saveat=False and kind "checkpointed", write passed save times by
    _save_window (the loop is then forward-differentiable too) instead of an inner loop.
    replay: Decisions recorded by a run of the same solve (record_decisions): each attempt takes
    the recorded step, landing and acceptance. A reverse-mode loop that recomputes steps from its
    checkpoints runs them in another compiled program, which rounds differently; the error
    estimate (a difference of nearly equal solutions) turns that rounding into step sizes ~1e-9
    apart, and the reverse pass would differentiate a neighbouring discrete solution.
    """
    tab = cfg.tableau
    dtype = state.y.dtype
    n_save = saveat.shape[0]
    h_default = state.h if dt0 is None else lax.stop_gradient(jnp.asarray(dt0, dtype))
    if (impulses is not None or rhs.n_state is not None) and not cfg.land_on_saveat:
        raise ValueError("impulses and n_state need land_on_saveat=True")
    # a recording run writes as the loop that replays it will (see replay)
    window = save_window and not cfg.land_on_saveat and (kind != "lax" or state.decisions is not None)

    def cond(st):
        return (st.t < t1) & (st.status == OK)

    def advance(st: LoopState):
        """One step attempt: the new state and (t, h, accept, the StepResult)."""
        t, y = st.t, st.y
        i = jnp.searchsorted(stops, t, side="right")
        stop, stop_bp = stops[i], stop_is_bp[i]
        if window:  # no step passes more than SAVE_WINDOW save times (see _save_window)
            last = st.save_idx + SAVE_WINDOW - 1
            # a grid choice, without derivative (else t would carry one in every step's reverse pass)
            cap_stop = lax.stop_gradient(jnp.where(last < n_save, saveat[jnp.minimum(last, n_save - 1)], jnp.inf))
            stop, stop_bp = jnp.minimum(stop, cap_stop), stop_bp & (stop <= cap_stop)
        attempt = jnp.minimum(st.accepted + st.rejected, cfg.max_steps - 1)
        h_try = jnp.minimum(st.h, rhs.cap) if replay is None else replay.h_try[attempt]
        # a stop τ_min past a breakpoint is another sum of the delays than t + τ_min and may lie an
        # ulp beyond it: capped steps then stopped an ulp short and left a step of an ulp, whose stages
        # read the jumps on the wrong side (dL/dτ off by 3.9e-3 at rtol 1e-3, τ = 0.3 from t0 = 0.37)
        land = (stop - t) <= jnp.minimum(1.01 * h_try, rhs.cap + _history.side_tolerance(t, stop))
        land = land if replay is None else replay.land[attempt]
        h = jnp.where(land, stop - t, h_try)
        t_next = jnp.where(land, stop, t + h)
        lookups = None if rhs.lookups is None else jax.vmap(lambda s, left: rhs.lookups(st.hist, s, left))
        step = rk_step(tab, lambda s, z, left, *looked: rhs.eval(st.hist, s, z, left, *looked), t, y, h, st.k1,
                       rhs.n_state, None if rhs.hist_part is None else rhs.hist_part[1], lookups,
                       rhs.uncontrolled_from)
        y1 = step.y1
        finite = jnp.all(jnp.isfinite(y1))
        cut = (lambda v: v) if rhs.n_state is None else (lambda v: v[:rhs.n_state])
        acc = st.acc
        norms = _error_norms(rhs, step.err, y, y1, rtol, atol) if tab.adaptive else []
        if rhs.quadrature is not None:
            increment = rhs.quadrature(t, t_next, step.coeffs)
        err = functools.reduce(jnp.maximum, norms) if tab.adaptive else jnp.where(finite, 0.0, jnp.inf)
        err = lax.stop_gradient(err)  # it only steers the step size
        accept, h_new, prev_err = cfg.controller.adapt(h, h_default, err, st.last_rejected,
                                                       st.prev_err, tab.error_order or tab.order)
        accept = accept & finite if replay is None else replay.accept[attempt]
        h_new = jnp.where(accept & land, jnp.maximum(h_new, st.h), h_new)
        h_new = lax.stop_gradient(h_new)

        t_new = jnp.where(accept, t_next, t)
        y_new = jnp.where(accept, y1, y)
        hist, hist_ok = st.hist, jnp.asarray(True)
        if hist is not None:
            oldest = t_next - rhs.max_delay
            if rhs.keep_from is not None:
                oldest = jnp.minimum(oldest, rhs.keep_from)
            coeffs = step.coeffs if rhs.hist_part is None else step.coeffs[:, slice(*rhs.hist_part)]
            hist, hist_ok = _history.push(hist, t, t_next, coeffs, oldest, accept)
        if rhs.quadrature is not None:
            acc = acc + jnp.where(accept, increment, 0.0)

        if cfg.land_on_saveat:
            j = jnp.minimum(st.save_idx, n_save - 1)
            # a step lands on each save time, or passes one that is no stop (saves_off_breakpoints)
            hit = accept & (st.save_idx < n_save) & (saveat[j] <= t_next)
            # On a landing θ_s = (saveat[j] - t) / h is exactly 1, but not its derivative when t_next is
            # a breakpoint that moves with τ: the saved value then stays x at the fixed save time, the
            # step's polynomial P(θ_s) (the piece before the breakpoint), not x at the moving point.
            # Added as P(θ_s) - P(1), zero in value, so that the saved value is y1 bit for bit and every
            # order of derivative is P's (a first-order Taylor term got second derivatives wrong). A
            # passed save time is P's at its own θ_s.
            if rhs.n_state is None:
                theta_s = jnp.where(hit, (saveat[j] - t) / h, 1.0)  # far from 1 when not hit: P could overflow
                y_save = y1 + (_history.horner(step.coeffs, theta_s) - _history.horner(step.coeffs, 1.0))
            else:  # the adjoint's sweep (its save times never move with a parameter); under vmap a
                y_save = cut(y1)  # batched save selects over the whole buffer: no ∫ f_pᵀλ in it
            # ys is a write-only buffer of the checkpointed loop (not copied into every checkpoint).
            ys = eqxi.buffer_at_set(st.ys, j, y_save, pred=hit)
            save_idx = st.save_idx + hit.astype(jnp.int32)
        elif window:
            ys, save_idx = _save_window(st.ys, st.save_idx, saveat, accept, t, t_next, step.coeffs)
        else:
            ys, save_idx = _save_interpolated(st.ys, st.save_idx, saveat, accept, t, t_next, step.coeffs,
                                              "checkpointed" if kind == "stored" else kind)
        probes = st.probes
        if probe_times is not None:
            on_probe = accept & (probe_times == t_next)
            if probe_fn is None:
                probes = jnp.where(jnp.reshape(on_probe, (-1,) + (1,) * y1.ndim), y1, probes)
            else:
                value = _cond_any(jnp.any(on_probe), lambda: probe_fn(hist, t_next, y1), probes[0])
                probes = jnp.where(on_probe[:, None], value[None], probes)
        if impulses is not None:
            y_new = y_new + jnp.where(hit, impulses[j], jnp.zeros_like(y_new))

        if tab.fsal:
            recompute = accept & land & stop_bp & (hist is not None)
            if impulses is not None:
                recompute = recompute | hit
            k1 = _cond_any(recompute, lambda: rhs.eval(hist, t_new, y_new, False), step.k_last)
            k1 = jnp.where(accept, k1, st.k1)
            k1_left = jnp.where(accept, ~recompute, st.k1_left)
            evals = tab.stages - 1 + recompute.astype(jnp.int32)
        else:
            k1 = rhs.eval(hist, t_new, y_new, False)
            k1_left = jnp.asarray(False)
            evals = tab.stages

        accepted = st.accepted + accept.astype(jnp.int32)
        rejected = st.rejected + (~accept).astype(jnp.int32)
        tiny = 4 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(t), jnp.abs(t1))
        status = jnp.where(accepted + rejected >= cfg.max_steps, MAX_STEPS, OK)
        # ~(h_new > tiny), not h_new <= tiny: a NaN step (Hairer's starting step from a NaN first stage,
        # an adjoint sweep's from a NaN derivative) is no number either, and used to run to max_steps
        status = jnp.where(~accept & ~(h_new > tiny), jnp.where(finite, UNDERFLOW, NONFINITE), status)
        if not tab.adaptive:
            status = jnp.where(finite, status, NONFINITE)
        status = jnp.where(hist_ok, status, HISTORY_FULL)
        status = jnp.where((t_new >= t1) & (status == MAX_STEPS), OK, status)
        new = LoopState(
            t=t_new, y=y_new, k1=k1, h=h_new, prev_err=jnp.where(accept, prev_err, st.prev_err),
            last_rejected=~accept, nonfinite=~finite, ys=ys, save_idx=save_idx,
            hist=hist, acc=acc, probes=probes, accepted=accepted, rejected=rejected, rhs_evals=st.rhs_evals + evals,
            status=status.astype(jnp.int32), k1_left=k1_left,
            overflowed=st.overflowed | (~accept & ~(finite & jnp.isfinite(err))),
            decisions=None if st.decisions is None else Decisions(
                *(eqxi.buffer_at_set(buf, attempt, v) for buf, v in zip(st.decisions, (h_try, land, accept)))))
        return new, (t, h, accept, step)

    def body(st: LoopState) -> LoopState:
        return advance(st)[0]

    if rhs.param_part is not None:
        return _run_chunked(cond, advance, state, rhs, tab)
    if kind == "lax":  # buffers: under vmap a finished trajectory's writes are skipped slice by
        # slice, instead of a select over the whole buffer (JAX's batched while) every step
        return eqxi.while_loop(cond, body, state, kind="lax", buffers=_lax_buffers)
    if kind == "stored" and state.hist is not None:  # a slot would hold the whole history buffer
        kind = "checkpointed"
    if kind == "stored":  # an ODE's Backprop without checkpoints (see _reverse_loop)
        final = stored_while_loop(cond, body, state, max_steps=cfg.max_steps, split=lambda st: (st._replace(ys=None), st.ys),
                                  merge=lambda small, ys: small._replace(ys=ys), identity=lambda st: st.last_rejected)
        return final._replace(overflowed=jnp.asarray(False))  # its reverse pass takes no rejected attempt's VJP
    state = _perturbed_as_in_the_loop(state, (stops, rhs.cap, saveat))
    final = eqxi.while_loop(cond, body, state, kind="checkpointed", max_steps=cfg.max_steps, checkpoints=checkpoints,
                            buffers=lambda st: st.ys)
    dyn, static = eqx.partition(final, eqx.is_inexact_array)
    return eqx.combine(_cotangents_materialised(dyn), static)


# Equinox's checkpointed loop learns which carries a derivative reaches (and which cotangents
# stay zero) by re-tracing the loop body until nothing changes: three linearizations in its
# forward rule, three more in its backward rule and two vjps, each a full trace of the step.
# Handing it the answer up front makes each of these one trace. The answer: every floating
# carry but the step-size control's (h, prev_err: no derivative, see advance), where the
# time and the history's step bounds carry one only when t, a stop, the step cap or a save
# time does (a learned delay, a learned save time); otherwise they would cost a backward
# pass through every lookup's time for nothing.
_NO_DERIVATIVE = ("h", "prev_err")


def _time_leaves(st):
    return (st.t,) if st.hist is None else (st.t, st.hist.t_start, st.hist.t_end)


@jax.custom_jvp
def _perturbed_as_in_the_loop(state, time_sources):
    return state


def _perturbed_as_in_the_loop_jvp(primals, tangents):
    (state, _), (t_state, t_sources) = primals, tangents
    live = lambda tree: [t for t in jax.tree.leaves(tree)
                         if not isinstance(t, SymbolicZero) and jnp.issubdtype(t.dtype, jnp.inexact)]
    any_live, time_live = live((t_state, t_sources)), live((_time_leaves(t_state), t_sources))

    def fill(anchors, x, t):  # a zero tangent that depends on a live one, so JAX keeps it
        if not isinstance(t, SymbolicZero) or not anchors or not eqx.is_inexact_array(x):
            return t
        return jnp.zeros_like(x) + 0 * jnp.ravel(anchors[0])[0].astype(x.dtype)

    out = {}
    for name, x, t in zip(state._fields, state, t_state):
        if name in _NO_DERIVATIVE or x is None:
            out[name] = t
        elif name == "t":
            out[name] = fill(time_live, x, t)
        elif name == "hist":
            out[name] = type(x)(**{
                f: (fill(time_live, getattr(x, f), getattr(t, f)) if f in ("t_start", "t_end")
                    else fill(any_live, getattr(x, f), getattr(t, f))) for f in x._fields})
        else:
            out[name] = jax.tree.map(lambda a, b: fill(any_live, a, b), x, t,
                                     is_leaf=lambda v: isinstance(v, SymbolicZero))
    return state, type(state)(**out)


_perturbed_as_in_the_loop.defjvp(_perturbed_as_in_the_loop_jvp, symbolic_zeros=True)


@jax.custom_vjp
def _cotangents_materialised(final):
    return final


_cotangents_materialised.defvjp(lambda final: (final, None), lambda _, ct: (ct,))  # JAX instantiates zeros


def _run_chunked(cond, advance, state, rhs, tab):
    """The loop in chunks of PARAM_CHUNK iterations that record each accepted step's stages;
    Rhs.param_part folds a chunk's records into LoopState.acc at once. Under vmap each
    trajectory's accumulator is then read and written once per chunk, not at every stage."""
    dtype, K = state.y.dtype, PARAM_CHUNK
    cut = (lambda v: v) if rhs.n_state is None else (lambda v: v[:rhs.n_state])
    R = len(_record_points(tab, rhs)[0])

    def chunk(st):
        x0 = cut(st.y)
        rec = (jnp.full((K, R), st.t), jnp.broadcast_to(x0, (K, R) + x0.shape),
               jnp.ones((K, R), bool), jnp.zeros((K, R), dtype))

        def step(carry):
            st, rec, i = carry
            new, (t, h, accept, step) = advance(st)
            row = _records(tab, rhs, st.k1_left, t, h, accept, step)
            rec = tuple(eqxi.buffer_at_set(buf, i, v) for buf, v in zip(rec, row))
            return new, rec, i + 1

        st, rec, n = eqxi.while_loop(lambda cr: cond(cr[0]) & (cr[2] < K), step, (st, rec, jnp.zeros((), jnp.int32)),
                                     kind="lax", buffers=lambda cr: _lax_buffers(cr[0]) + cr[1])
        w = jnp.where(jnp.arange(K)[:, None] < n, rec[3], 0.0)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        return st._replace(acc=st.acc + rhs.param_part(flat(rec[0]), flat(rec[1]), flat(rec[2]), flat(w)))

    return eqxi.while_loop(cond, chunk, state, kind="lax", buffers=_lax_buffers)


def _error_norms(rhs: Rhs, err, y, y1, rtol, atol) -> list:
    """The error norm of each part of the state (Rhs.err_groups): one part without n_state.
    err covers y[:Rhs.uncontrolled_from] (see _step.rk_step's n_err)."""
    if rhs.n_state is None:
        return [error_norm(err, y, y1, rtol, atol)]
    bounds = (0,) + (rhs.err_groups or (rhs.n_state,)) + (err.shape[0],)
    return [error_norm(err[a:b], y[a:b], y1[a:b], rtol, atol) for a, b in zip(bounds, bounds[1:]) if b > a]


def _record_points(tab: ButcherTableau, rhs: Rhs):
    """(fractions θ of the step, weights, stage index or None) of one step's records for
    Rhs.param_part: the stages whose weight b_i is nonzero, or the nodes of Rhs.param_nodes on the
    step's dense output."""
    if rhs.param_nodes is None:
        used = [i for i, w in enumerate(tab.b) if w != 0.0]
        return [tab.c[i] for i in used], [tab.b[i] for i in used], used
    theta, w = rhs.param_nodes
    return list(theta), list(w), None


def _records(tab, rhs, k1_left, t, h, accept, step):
    """(times, states, lookup sides, weights h·w) of one step's records (see _record_points);
    a rejected step's are zero-weighted and read at its start (its stages may not be finite)."""
    dtype = step.y1.dtype
    theta, weights, used = _record_points(tab, rhs)
    c, w = jnp.asarray(theta, dtype), jnp.asarray(weights, dtype)
    if used is not None:
        xs = jnp.stack([step.x_stages[j] for j in used])
        left = jnp.stack([k1_left if j == 0 else jnp.asarray(_history.reads_left(tab.c[j])) for j in used])
    else:
        cut = (lambda v: v) if rhs.n_state is None else (lambda v: v[:rhs.n_state])
        xs = jnp.stack([cut(_history.horner(step.coeffs, th)) for th in theta])
        left = jnp.asarray([_history.reads_left(th) for th in theta])
    xs = jnp.where(accept, xs, step.x_stages[0])
    return t + c * h, xs, left, jnp.where(accept, h * w, 0.0)


def _cond_any(pred, compute, otherwise):
    """``compute()`` where ``pred``, else ``otherwise``; ``compute`` runs only when ``pred`` holds
    for some trajectory. Under vmap a lax.cond on a batched predicate becomes a select whose
    operands are all broadcast to the batch, the parameters closed over by ``compute``
    included: every trajectory then multiplied by its own copy of each weight matrix (the vmapped
    HNN adjoints spent a third of their time there). Here the predicate of the cond is the
    batch's any (unbatched), and the select happens on the results."""
    return lax.cond(eqxi.unvmap_any(pred), lambda: jnp.where(pred, compute(), otherwise), lambda: otherwise)


def _lax_buffers(st: LoopState):
    recorded = () if st.decisions is None else tuple(st.decisions)
    return ((st.ys,) if st.hist is None else (st.ys, st.hist.coeffs)) + recorded


def _save_interpolated(ys, save_idx, saveat, accept, t_a, t_b, coeffs, kind):
    """Write the dense output at every save time in (t_a, t_b] of an accepted step (an inner
    loop; checkpointed, writing into the outer loop's buffer, under Backprop)."""
    n_save = saveat.shape[0]

    def pending(c):
        i, _ = c
        return accept & (i < n_save) & (saveat[jnp.minimum(i, n_save - 1)] <= t_b)

    def write(c):
        i, ys = c
        theta = (saveat[i] - t_a) / (t_b - t_a)
        return i + 1, eqxi.buffer_at_set(ys, i, _history.horner(coeffs, theta))

    save_idx, ys = eqxi.while_loop(pending, write, (save_idx, ys), kind=kind, max_steps=n_save, buffers=lambda c: c[1])
    return ys, save_idx


# Under Backprop differentiated in forward mode too (jax.jvp of jax.grad) the save times a step
# passes are written by SAVE_WINDOW unrolled writes: the inner checkpointed loop is a custom VJP
# inside the outer one's forward rule, which forward mode cannot differentiate (a Hessian-vector
# product with land_on_saveat=False failed). A step that would pass more lands on the last it may
# write. Not the default: the plain gradient of the HNN benchmark took 1.23x as long this way.
SAVE_WINDOW = 8


def _save_window(ys, save_idx, saveat, accept, t_a, t_b, coeffs):
    n_save, written = saveat.shape[0], save_idx
    for w in range(SAVE_WINDOW):
        i = save_idx + w
        j = jnp.minimum(i, n_save - 1)
        hit = accept & (i < n_save) & (saveat[j] <= t_b)
        theta = jnp.where(hit, (saveat[j] - t_a) / (t_b - t_a), 1.0)  # far outside [0, 1] P could overflow
        ys = eqxi.buffer_at_set(ys, j, _history.horner(coeffs, theta), pred=hit)
        written = written + hit.astype(jnp.int32)
    return ys, written
