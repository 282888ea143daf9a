"""The public ``solve``: validates arguments, then hands off to the chosen sensitivity."""

from __future__ import annotations

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _directional, _forward
from ._controller import ConstantStepSize, PIController
from ._forward import HISTORY_FULL, MAX_STEPS, NONFINITE, OK, UNDERFLOW, WINDOWS_FULL
from ._precision import check_precision, with_precision
from ._problem import DDEProblem, ODEProblem, floats_as_arrays, split_settings
from ._setup import AD_TRACERS, Options, build, delays_of, differentiation, fail_if, initial_state, is_concrete
from ._tableau import ExplicitRK, Tsit5
from .sensitivity import AbstractSensitivity, Backprop, ForwardMode, QuadratureAdjoint, default_sensitivity


class Solution(eqx.Module):
    """``ts`` (the save times), ``ys`` (len(ts), *x.shape) and ``stats``: accepted steps,
    rejected steps and right-hand-side evaluations of the forward solve."""

    ts: jax.Array
    ys: jax.Array
    stats: dict


def _error_messages(opts: Options) -> list[str]:
    max_steps, history_size = opts.max_steps, opts.history_size
    msgs = [""] * 6
    msgs[MAX_STEPS] = (f"ndde: step budget exhausted: max_steps={max_steps} attempted steps did not "
                       "reach the end (t1; t0 for an adjoint's backward sweep, which also stops at every "
                       "observation). Raise max_steps (solve(..., max_steps=...)) or loosen rtol/atol."
                       + (" A DDE's step is never longer than its smallest delay: [t0, t1] takes at least "
                          "(t1 - t0) / min(delays) steps." if opts.dde else "") + opts.rounding_hint)
    msgs[UNDERFLOW] = ("ndde: step size underflow: the controller shrank the step below the "
                       "floating-point resolution of t. The problem is probably stiff (or the solution "
                       "has a singularity); an explicit method cannot integrate it at this tolerance." + opts.rounding_hint)
    msgs[NONFINITE] = ("ndde: NaN or inf in the state: the right-hand side returned a non-finite value "
                       "or the solution blew up. Check rhs, p and x0 (and dt0 for fixed steps). In an "
                       "adjoint's backward sweep the state is the adjoint: there the rhs's derivative was "
                       "non-finite (e.g. jnp.sqrt or jnp.log at 0, or a NaN in an unused jnp.where branch).")
    msgs[HISTORY_FULL] = (f"ndde: history buffer full: history_size={history_size} stored steps do not "
                          "cover what must be kept (the largest delay, or an adjoint's segment). Raise "
                          "history_size (solve(..., history_size=...)) or the adjoint's checkpoints.")
    msgs[WINDOWS_FULL] = (f"ndde: InterpolatingAdjoint keeps the steps within the largest delay before each "
                          f"checkpoint of a DDE, in one log of history_size={history_size} steps, and they do "
                          "not fit. Raise history_size (solve(..., history_size=...)) or use fewer checkpoints "
                          "(InterpolatingAdjoint(checkpoints=...)).")
    return msgs


def check_status(x, status, opts: Options):
    return fail_if(x, status != OK, _error_messages(opts), opts.on_error, status)


NONFINITE_GRADIENT = ("ndde: the gradient came out NaN or inf although the solve succeeded: a derivative on "
                      "the way is non-finite, of the rhs (e.g. jnp.sqrt or jnp.log at 0, jnp.linalg.norm of a zero "
                      "vector, or a NaN in an unused jnp.where branch) or of the loss with respect to ys. "
                      "jax.config.update('jax_debug_nans', True) finds the operation; throw=False returns the NaN "
                      "gradient instead of raising.")


NONFINITE_LOSS_DERIVATIVE = (
    "ndde: the loss's derivative with respect to the solution ys (the cotangent the backward pass starts from) "
    "is NaN or inf although the solve succeeded: the loss, not the solve, is non-finite there (e.g. jnp.sqrt or "
    "jnp.log of a value that is 0 at the solution, jnp.linalg.norm of a zero residual). "
    "jax.config.update('jax_debug_nans', True) finds the operation; throw=False returns the NaN gradient "
    "instead of raising.")


def check_loss_cotangent(ct_ys, status, on_error):
    """ct_ys, with NONFINITE_LOSS_DERIVATIVE when it holds a NaN or inf and the forward solve
    succeeded (a failed solve's own error comes first): a backward sweep started from it would
    report a NaN adjoint state, as if the rhs's derivative were at fault."""
    return fail_if(ct_ys, ~_all_finite(ct_ys) & (status == OK), NONFINITE_LOSS_DERIVATIVE, on_error)


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)] + [True]))


def check_gradient(grad, status, opts: Options):
    """grad (a pytree) with one check: the error of status (of the solve or of a backward sweep)
    when it is not OK, else NONFINITE_GRADIENT when an entry is NaN or inf. A check on ys alone
    is compiled away when only the gradient is used, and the gradient may not read the sweep's
    own state (QuadratureAdjoint's ∫ f_pᵀλ with x0 independent of p): so it sits here."""
    msgs = _error_messages(opts)
    failed = status != OK
    return fail_if(grad, failed | ~_all_finite(grad), msgs + [NONFINITE_GRADIENT], opts.on_error,
                   jnp.where(failed, status, len(msgs)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def finite_cotangent(tree, on_error):
    """The identity; its cotangent (Backprop's gradient of what it wraps) is checked finite."""
    return tree


finite_cotangent.defvjp(lambda tree, on_error: (tree, None),
                        lambda on_error, _, ct: (fail_if(ct, ~_all_finite(ct), NONFINITE_GRADIENT, on_error),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def backprop_checks(ys, y_final, status, overflowed, msgs, on_error):
    """ys; its reverse pass stops with a clear error (1) when the forward solve failed: the check
    on ys is compiled away when only a gradient is used (jax.jit(jax.grad(L)) with L linear in
    ys), and a failed solve would give a gradient and no error; (2) when a rejected step attempt
    of the forward loop overflowed (a stage of ±inf or NaN): Backprop's VJP of that attempt
    multiplies its zero cotangent by the infinite stage derivatives and every gradient would come
    out NaN. (Skipping those VJPs under a lax.cond slowed vmapped Backprop 2.6x: a batched cond
    batches every operand; zeroing non-finite residuals cost 15-20% everywhere.)
    With on_error="nan" (throw=False) a failed solve's gradient must be NaN, but the save times
    it never reached carry no derivative of p, so a NaN cotangent of ys alone can stop short of p
    (it did for a loss of ys[-1] alone): the loop's final state, which depends on every step,
    gets a NaN cotangent too (zero otherwise)."""
    return ys


def _checks_fwd(ys, y_final, status, overflowed, msgs, on_error):
    return ys, (status, overflowed, jnp.zeros_like(y_final))


def _checks_bwd(msgs, on_error, res, ct):
    status, overflowed, zero = res
    ct = fail_if(ct, status != OK, list(msgs), on_error, status)
    ct = check_loss_cotangent(ct, status, on_error)
    ct = fail_if(ct, overflowed, "ndde: Backprop cannot differentiate this solve: a rejected step attempt "
                 "overflowed (a stage of inf or NaN), and reverse mode through it makes every gradient "
                 "NaN. Start with a smaller step (solve(..., dt0=...)) or use InterpolatingAdjoint(), "
                 "QuadratureAdjoint() or ForwardMode() (or, for an ODE, Backprop() without checkpoints), which "
                 "do not differentiate rejected attempts.", on_error)
    ct_final = jnp.where(status != OK, jnp.nan, zero) if on_error == "nan" else zero
    return ct, ct_final, None, None


backprop_checks.defvjp(_checks_fwd, _checks_bwd)


INT32_MAX = 2**31 - 1  # step and slot counters are int32 inside the compiled loop


def _positive_int(name, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value > INT32_MAX:
        raise ValueError(f"{name} must be at most 2**31 - 1 = {INT32_MAX} (the compiled loop counts in int32), "
                         f"got {value!r}")
    return int(value)


def _positive(name, value) -> float:
    """A tolerance as a Python float (it fixes the compiled step control, so it cannot be traced)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number, got a traced value ({value.aval}): tolerances "
                        "steer the compiled step control; pass a Python float (close over it, not as an argument of jit)")
    if isinstance(value, (int, float, np.generic, np.ndarray, jax.Array)) and not isinstance(value, bool) \
            and jnp.ndim(value) == 0 and jnp.issubdtype(jnp.result_type(value), jnp.number):
        number = float(value)
        if math.isfinite(number) and number > 0:
            return number
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def forward_solve(prob, p, saveat, opts: Options, kind="lax", checkpoints=None, save_window=False, replay=None):
    """Run the forward loop; returns (final LoopState, Built). replay: take the Decisions of a
    recording run (recorded_decisions)."""
    built = build(prob, p, saveat, opts)
    cfg = opts.loop_config()
    state = _forward.init_state(cfg, built.rhs, built.y0, built.t0, built.t1, saveat, built.rtol, built.atol,
                                opts.dt0, built.hist0)
    final = _forward.run(cfg, built.rhs, state, built.t1, saveat, built.stops, built.stop_is_bp, built.rtol,
                         built.atol, opts.dt0, kind=kind, checkpoints=checkpoints, save_window=save_window,
                         replay=replay)
    return final, built


def recorded_decisions(prob, p, saveat, opts: Options):
    """Every step attempt's decisions in a forward solve that no derivative flows through, for
    the differentiated loops of Backprop and ForwardMode to replay: both then differentiate the
    one discrete solution whatever programs XLA compiles them into (see _forward.run's replay).
    That solve integrates x with its tangent along a fixed direction of p, both under the step
    control, so that its steps resolve the derivative too (see _directional)."""
    floats, others = eqx.partition((prob, p, saveat), eqx.is_inexact_array)
    prob, p, saveat = eqx.combine(lax.stop_gradient(floats), others)
    built = build(prob, p, saveat, opts)
    rhs, y0, hist0 = _directional.tangent_problem_parts(prob, p, built, opts)
    cfg = opts.loop_config()
    state = _forward.init_state(cfg, rhs, y0, built.t0, built.t1, saveat, built.rtol, built.atol, opts.dt0, hist0)
    final = _forward.run(cfg, rhs, _forward.record_decisions(state, opts.max_steps), built.t1, saveat, built.stops,
                         built.stop_is_bp, built.rtol, built.atol, opts.dt0, save_window=opts.grad_differentiated)
    return final.decisions


def backprop_solve(prob, p, saveat, opts: Options, checkpoints=None):
    """(ys, stats) of the forward loop that reverse mode differentiates step by step (Backprop).
    With opts.grad_differentiated the reverse pass will itself be differentiated in forward mode
    (see _forward.SAVE_WINDOW)."""
    if opts.on_error != "nan":  # a NaN gradient is an error; with throw=False it is returned as is
        # (fail_if's "nan" form must not run here: it broadcast each shared parameter's cotangent,
        # unbatched under jax.vmap, over the batch, and JAX summed the copies into the gradient)
        floats, others = eqx.partition((prob, p), eqx.is_inexact_array)
        prob, p = eqx.combine(finite_cotangent(floats, opts.on_error), others)
    # A DDE's loop (equinox's checkpointed loop) recomputes steps from its checkpoints in the
    # backward program: it replays the decisions of a plain solve (see _forward.run's replay)
    replay = recorded_decisions(prob, p, saveat, opts) if opts.dde and opts.reverse else None
    final, _ = forward_solve(prob, p, saveat, opts, kind="checkpointed" if checkpoints else "stored",
                             checkpoints=checkpoints, save_window=opts.grad_differentiated, replay=replay)
    ys = check_status(final.ys, final.status, opts)
    msgs = tuple(_error_messages(opts))
    return (backprop_checks(ys, final.y, final.status, lax.stop_gradient(final.overflowed), msgs, opts.on_error),
            stats_of(final))


def stats_of(final):
    return {"steps": final.accepted, "rejected": final.rejected, "rhs_evals": final.rhs_evals}


def solve(prob, p=None, *, saveat=None, solver=None, rtol=1e-6, atol=1e-8, sensitivity=None, max_steps=4096,
          dt0=None, controller=None, history_size=None, land_on_saveat=True, throw=True,
          matmul_precision="highest", _track_breakpoints=True) -> Solution:
    """Solve an ``ODEProblem`` or ``DDEProblem`` with parameters ``p``: any pytree, whose
    floating-point arrays and floats are the parameters; other leaves (an int, a bool, a string)
    are settings the problem's functions receive unchanged and no method differentiates.
    The solve computes in the initial state's dtype (float32 or float64; half precision is
    refused); every method returns the gradient of each leaf of p in that leaf's dtype.

    saveat: 1-D increasing times in [t0, t1] (default: t1 only). The solver lands exactly on
    each (``land_on_saveat=True``, the default: values at save times are step values; a save
    time within eps^(2/3)·max(|t0|, |t1|) of a DDE breakpoint is read from the step's
    polynomial on the side it lies, not landed on apart from it); with
    ``land_on_saveat=False`` save times are read from the dense output (order 4 for
    Tsit5/Dopri5) and cost no extra steps, as in diffrax.
    A DDE whose delays put two breakpoints on one time (commensurate delays: τ1 = 2τ2) and
    depend on a traced value (p under jax.grad, jax.jit or jax.vmap; not through
    jax.lax.stop_gradient) is solved with them moved apart, without derivative, by ~1e-11 of
    themselves in float64 (1e-5 to 3e-4 in float32), so that each breakpoint gets its own
    landing and dL/dτ sees each move (see README).
    solver: an ``ExplicitRK`` (default ``Tsit5()``); RK4 and Euler need ``dt0``.
    sensitivity: how ``jax.grad`` differentiates the solve (default
    ``InterpolatingAdjoint(checkpoints=16)``; see ``solvers.sensitivity``).
    controller: ``PIController()`` for adaptive tableaus (default) or ``ConstantStepSize()``
    (steps of ``dt0``). max_steps bounds accepted + rejected steps; history_size bounds the
    number of stored steps a DDE keeps for its delayed lookups (default min(max_steps, 256);
    QuadratureAdjoint keeps every step and defaults to max_steps), and those InterpolatingAdjoint
    keeps within max τ before its checkpoints, all checkpoints together. Left at None, outside
    jit and vmap (an eager ``jax.grad`` included) a solve whose buffer fills is run again with
    4x the buffer, up to max_steps, and a DDE adjoint's backward sweep then gets 4x that again;
    under jit or vmap, with throw=False (which raises nothing), and where the backward sweep
    alone fills its buffer, it stops with an error (NaN) that says to raise history_size. An
    explicit history_size is a cap: the solve never grows it.
    throw: a failure inside the solve or its gradient (step budget exhausted, step size
    underflow, NaN in the state, history buffer full, a non-positive delay, bad saveat) raises
    an error that says what to change (the default), also from a jitted gradient that never
    reads ys. With ``throw=False`` it makes ys and the gradient NaN instead (under jax.vmap, only
    the failing trajectories'), and the compiled
    program holds no host callback, so JAX's persistent compilation cache can store it; the
    training pipeline runs its steps this way and re-runs a failed step with ``throw=True`` to
    report the message.
    matmul_precision: the problem's functions are traced under
    ``jax.default_matmul_precision(matmul_precision)`` (default "highest"): JAX's default float32
    product on GPUs and TPUs keeps ~3 digits (TF32), which breaks float32 error control. None
    leaves JAX's setting. Nothing changes on CPUs or in float64.

    Called outside jit and vmap (an eager ``jax.grad`` or ``jax.jvp`` included), ``solve``
    compiles itself as one program, as diffrax's ``diffeqsolve`` does: once per problem (its
    functions, by identity) and options, reused by a later call with new arrays or floats in
    ``p``. So ``rhs``, ``history``, ``delays`` and ``x0`` always see traced values.
    """
    solver = Tsit5() if solver is None else solver
    if not isinstance(solver, ExplicitRK):
        raise TypeError(f"solver must be an ExplicitRK such as Tsit5(), got {solver!r}")
    if not isinstance(prob, (ODEProblem, DDEProblem)):
        raise TypeError(f"prob must be an ODEProblem or DDEProblem, got {type(prob).__name__}")
    sensitivity = default_sensitivity() if sensitivity is None else sensitivity
    if not isinstance(sensitivity, AbstractSensitivity):
        raise TypeError(f"sensitivity must be one of Backprop(), ForwardMode(), BacksolveAdjoint(), "
                        f"InterpolatingAdjoint(), QuadratureAdjoint(); got {sensitivity!r}")
    if isinstance(prob, DDEProblem) and not sensitivity.supports_dde:
        raise ValueError(f"{type(sensitivity).__name__} does not support delay equations (the past cannot "
                         "be re-integrated backward); use InterpolatingAdjoint(), QuadratureAdjoint(), "
                         "Backprop() or ForwardMode()")
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    max_steps = _positive_int("max_steps", max_steps)
    sized_by_solve = history_size is None
    if history_size is None:
        history_size = max_steps if isinstance(sensitivity, QuadratureAdjoint) else min(max_steps, 256)
    for name, flag in (("throw", throw), ("land_on_saveat", land_on_saveat)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    check_precision(matmul_precision)
    prob = with_precision(prob, matmul_precision)
    history_size = _positive_int("history_size", history_size)
    tab = solver.tableau
    if controller is None:
        controller = PIController() if tab.adaptive else ConstantStepSize()
    if not isinstance(controller, (PIController, ConstantStepSize)):
        raise TypeError(f"controller must be PIController(...) or ConstantStepSize(), got {controller!r}")
    if isinstance(controller, ConstantStepSize):
        if dt0 is None:
            raise ValueError(f"{tab.name} with constant steps needs dt0 (solve(..., dt0=...))")
    elif not tab.adaptive:
        raise ValueError(f"{tab.name} has no error estimate: use controller=ConstantStepSize() and dt0")
    if dt0 is not None and is_concrete(dt0) and not float(dt0) > 0:
        raise ValueError(f"dt0 must be positive, got {dt0!r}")

    dtype = jax.eval_shape(lambda: initial_state(prob, p)).dtype  # checks it, runs nothing
    t0, t1 = jnp.asarray(prob.t0, dtype), jnp.asarray(prob.t1, dtype)
    if is_concrete(t0) and is_concrete(t1) and not (float(t1) > float(t0) and math.isfinite(float(t1) - float(t0))):
        raise ValueError(f"need finite t0 < t1, got t0={float(t0)!r}, t1={float(t1)!r}")
    saveat = jnp.reshape(t1, (1,)) if saveat is None else jnp.asarray(saveat, dtype)
    if saveat.ndim != 1 or saveat.shape[0] == 0:
        raise ValueError(f"saveat must be a non-empty 1-D array of times, got shape {saveat.shape}")
    if throw and is_concrete(saveat) and is_concrete(t0) and is_concrete(t1):
        _check_saveat([float(t) for t in np.asarray(saveat)], float(t0), float(t1))  # the traced check names no value
    if land_on_saveat and is_concrete(saveat) and is_concrete(t0):
        landings = int(np.sum(np.asarray(saveat) > float(t0)))  # a step ends on each save time after t0
        if landings > max_steps:
            raise ValueError(f"ndde: the solve lands a step on each of saveat's {landings} times after t0, above "
                             f"max_steps={max_steps}: raise max_steps (solve(..., max_steps=...)) or read them from "
                             "the dense output (land_on_saveat=False; an adjoint's backward sweep still stops at "
                             "each of them)")
    separate = isinstance(prob, DDEProblem) and _delays_are_traced(prob, p)
    depth, forward_only = differentiation((prob, p, saveat, dt0))
    opts = Options(tab, controller, float(rtol), float(atol), max_steps, dt0, history_size,
                   bool(land_on_saveat), bool(_track_breakpoints), throw, separate,
                   forward_only=forward_only, grad_differentiated=depth >= 2, reverse=depth >= 1 and not forward_only,
                   rounding_hint=_rounding_hint(rtol, dtype), dde=isinstance(prob, DDEProblem))
    if not _outside_jit_and_vmap((prob, p, saveat, dt0)):
        return _solve_traced(prob, p, saveat, dt0, opts, sensitivity)
    if isinstance(prob, DDEProblem) and _all_concrete(p):
        taus = delays_of(prob, p, dtype)  # a ValueError naming the delays, before anything compiles
        if is_concrete(t0) and is_concrete(t1):  # not under an eager jax.grad with respect to them
            _check_budget_covers_the_delays(float(jnp.min(taus)), float(t0), float(t1), max_steps)
    # a float in p becomes a (weakly typed) array, so a new value reuses the compiled program
    p = floats_as_arrays(p)
    opts = dataclasses.replace(opts, dt0=None)
    while True:
        try:
            return _solve_compiled(prob, p, saveat, dt0, opts, sensitivity)
        except Exception as error:  # equinox's, or JAX's runtime error around it
            if not (sized_by_solve and opts.history_size < max_steps and _buffer_was_full(error, opts)):
                raise
        grown = min(HISTORY_GROWTH * opts.history_size, max_steps)
        opts = dataclasses.replace(opts, history_size=grown,
                                   sweep_history_size=min(HISTORY_GROWTH * grown, max_steps))


# The default history_size grows by this factor (up to max_steps) each time a solve called outside
# jit finds its buffer full, and an adjoint's backward sweep then gets this factor more again (its
# overflow shows only in the backward pass, where nothing can be run again; its steps may lie
# denser than the forward's, its step control watching the parameter integrals too). A fixed
# capacity of max_steps never fills but every lookup counts over the whole buffer: 4096 slots
# made the vmapped Mackey-Glass forward 4.2x slower than 256, and a sweep buffer of 4096 alone
# the vmapped InterpolatingAdjoint gradient 2.1x slower.
HISTORY_GROWTH = 4


def _buffer_was_full(error: Exception, opts: Options) -> bool:
    """The solve stopped because a history buffer (or InterpolatingAdjoint's log of windows) was
    full: its message is one of those two of _error_messages."""
    msgs = _error_messages(opts)
    return any(msgs[status] in str(error) for status in (HISTORY_FULL, WINDOWS_FULL))


def _check_budget_covers_the_delays(tau_min: float, t0: float, t1: float, max_steps: int):
    """A DDE's step is never longer than its smallest delay, so [t0, t1] takes at least
    (t1 - t0) / min τ steps; a budget below that can only run out, after compiling (the check
    inside the solve cannot name τ, which may be traced there)."""
    need = math.ceil((t1 - t0) / tau_min - 1e-6)
    if need > max_steps:
        raise ValueError(f"ndde: a DDE step is never longer than the smallest delay (tau = {tau_min:g}), so "
                         f"[{t0:g}, {t1:g}] takes at least {need} steps, above max_steps={max_steps}. Raise "
                         "max_steps (solve(..., max_steps=...)), or use larger delays or a shorter interval.")


def _rounding_hint(rtol: float, dtype) -> str:
    """Why a budget may run out at any max_steps: an rtol within 10 eps of the state's dtype asks
    the error estimate, a difference of two solutions rounded to that dtype, for what rounding
    alone may exceed."""
    eps = float(jnp.finfo(dtype).eps)
    if rtol >= 10 * eps:
        return ""
    return (f" rtol={rtol:g} is below 10 eps of {jnp.dtype(dtype).name} (eps = {eps:.3g}): rounding "
            "in the error estimate can keep any step from meeting it. Loosen rtol"
            + (" (float32: 1e-6 or above) or solve in float64." if eps > 1e-10 else "."))


def _check_saveat(ts, t0, t1):
    """A ValueError naming the first save time that is not finite, outside [t0, t1] or not after
    the one before it (the same conditions as the check inside the solve)."""
    for i, t in enumerate(ts):
        where = f"ndde: saveat[{i}] = {t!r}"
        if not math.isfinite(t):
            raise ValueError(f"{where} is not a finite time")
        if not t0 <= t <= t1:
            raise ValueError(f"{where} lies outside [t0, t1] = [{t0!r}, {t1!r}]")
        if i and not t > ts[i - 1]:
            raise ValueError(f"{where} does not come after saveat[{i - 1}] = {ts[i - 1]!r}: saveat must be "
                             "strictly increasing")


def _all_concrete(tree) -> bool:
    return all(is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def _outside_jit_and_vmap(tree) -> bool:
    """Every array is concrete, or an eager jax.grad / jax.jvp tracer over a concrete one."""
    for leaf in jax.tree_util.tree_leaves(tree):
        while isinstance(leaf, AD_TRACERS):
            leaf = leaf.primal
        if not is_concrete(leaf):
            return False
    return True


@eqx.filter_jit
def _solve_compiled(prob, p, saveat, dt0, opts: Options, sensitivity) -> Solution:
    """A solve called outside jit and vmap, as one compiled program (as diffrax's diffeqsolve):
    compiled once per problem and options instead of op by op (the seed example's first solve:
    9.5 s -> 3.3 s; an eager HVP with Backprop 19 s -> 10 s), and reused by a later call with new
    arrays. Arrays in ``prob``, ``p``, ``saveat`` and ``dt0`` are traced, everything else static
    (``dt0`` travels apart from ``opts``, which must hash). Under the caller's jit or vmap the
    solve stays inline: wrapped in a jit there, vmap then linearize of equinox's checkpointed
    loop failed to trace (test_vmap_never_copies_the_weights_per_trajectory)."""
    return _solve_traced(prob, p, saveat, dt0, opts, sensitivity)


def _delays_are_traced(prob, p) -> bool:
    """Whether delays(p) depends on a traced value (a leaf of p or a value it closes over) other
    than through jax.lax.stop_gradient: only then can it carry a derivative, and coinciding
    breakpoints need a landing each (_setup.solve_delays). Read from its jaxpr: under jit JAX
    stages even a constant array, so the value itself cannot tell."""
    arrays, others = eqx.partition(p, eqx.is_array)  # others: settings, an eqx.nn.MLP's activation
    closed = jax.make_jaxpr(lambda q: jnp.asarray(prob.delays(eqx.combine(q, others))))(arrays)
    jaxpr = closed.jaxpr
    leaves = jax.tree_util.tree_leaves(arrays)
    live = {v for v, leaf in zip(jaxpr.invars, leaves) if not is_concrete(leaf)}
    live |= {v for v, c in zip(jaxpr.constvars, closed.consts) if not is_concrete(c)}
    is_var = lambda v: isinstance(v, jax.extend.core.Var)  # not a Literal
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "stop_gradient":  # no derivative past it
            continue
        if any(is_var(v) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return any(is_var(v) and v in live for v in jaxpr.outvars)


def _solve_traced(prob, p, saveat, dt0, opts: Options, sensitivity) -> Solution:
    opts = dataclasses.replace(opts, dt0=dt0)
    t0, t1 = jnp.asarray(prob.t0, saveat.dtype), jnp.asarray(prob.t1, saveat.dtype)
    # written so that a NaN fails each test
    bad_span = ~(jnp.isfinite(t1 - t0) & (t1 > t0))
    bad_saveat = bad_span | ~(jnp.all(saveat >= t0) & jnp.all(saveat <= t1) & jnp.all(jnp.diff(saveat) > 0))
    if opts.throw:
        saveat = eqx.error_if(saveat, bad_span, "ndde: need finite t0 < t1.")
        saveat = eqx.error_if(saveat, bad_saveat, "ndde: saveat must be strictly increasing and lie in [t0, t1].")

    if opts.forward_only:  # jax.jvp, jax.jacfwd: JAX differentiates the while loop itself
        final, _ = forward_solve(prob, p, saveat, opts)
        ys, stats = check_status(final.ys, final.status, opts), stats_of(final)
        if not opts.throw:  # NaN tangents too (a where would give zeros)
            ys = ys * jnp.where(final.status == OK, 1.0, jnp.nan).astype(ys.dtype)
    elif isinstance(sensitivity, Backprop):
        ys, stats = backprop_solve(prob, p, saveat, opts, sensitivity.checkpoints)
    elif isinstance(sensitivity, ForwardMode):
        from .sensitivity._forward_mode import forward_mode_solve

        ys, stats = forward_mode_solve(*split_settings(prob, p), saveat, opts)
    else:
        from .sensitivity._adjoint import adjoint_solve

        ys, stats = adjoint_solve(*split_settings(prob, p), saveat, opts, sensitivity)
    if not opts.throw:  # a bad saveat makes every saved value NaN, as the failures inside the solve do
        ys = jnp.where(bad_saveat, jnp.asarray(jnp.nan, ys.dtype), ys)
    return Solution(ts=saveat, ys=ys, stats=stats)
