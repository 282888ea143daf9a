"""The public ``solve``: validates a problem, builds the right-hand side, runs the loop."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _history
from ._breakpoints import breakpoint_times, stop_times
from ._controller import ConstantStepSize, PIController
from ._forward import HISTORY_FULL, MAX_STEPS, NONFINITE, OK, UNDERFLOW, LoopConfig, Rhs, integrate
from ._problem import DDEProblem, ODEProblem
from ._tableau import ExplicitRK, Tsit5


class Solution(eqx.Module):
    """``ts`` (the save times), ``ys`` (len(ts), *x.shape) and ``stats``: accepted steps,
    rejected steps and right-hand-side evaluations."""

    ts: jax.Array
    ys: jax.Array
    stats: dict


def _error_messages(max_steps: int, history_size: int) -> list[str]:
    msgs = [""] * 5
    msgs[MAX_STEPS] = (f"ndde: step budget exhausted: max_steps={max_steps} attempted steps did not "
                       "reach t1. Raise max_steps (solve(..., max_steps=...)) or loosen rtol/atol.")
    msgs[UNDERFLOW] = ("ndde: step size underflow: the controller shrank the step below the "
                       "floating-point resolution of t. The problem is probably stiff (or the solution "
                       "has a singularity); an explicit method cannot integrate it at this tolerance.")
    msgs[NONFINITE] = ("ndde: NaN or inf in the state: the right-hand side returned a non-finite value "
                       "or the solution blew up. Check rhs, p and x0 (and dt0 for fixed steps).")
    msgs[HISTORY_FULL] = (f"ndde: history buffer full: history_size={history_size} stored steps do not "
                          "cover the largest delay. Raise history_size (solve(..., history_size=...)).")
    return msgs


def _check_positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def solve(prob, p=None, *, saveat=None, solver=None, rtol=1e-6, atol=1e-8, max_steps=4096,
          dt0=None, controller=None, history_size=None, land_on_saveat=True,
          _track_breakpoints=True) -> Solution:
    """Solve an ``ODEProblem`` or ``DDEProblem`` with parameters ``p`` (any pytree).

    saveat: 1-D increasing times in [t0, t1] (default: t1 only). The solver lands exactly on
    each (``land_on_saveat=True``, the default: values at save times are step values, and a
    save time is a point where a discrete gradient may legitimately kink); with
    ``land_on_saveat=False`` save times are read from the dense output (order 4 for
    Tsit5/Dopri5) and cost no extra steps, as in diffrax.
    solver: an ``ExplicitRK`` (default ``Tsit5()``); RK4 and Euler need ``dt0``.
    controller: ``PIController()`` for adaptive tableaus (default) or ``ConstantStepSize()``
    (steps of ``dt0``). max_steps bounds accepted + rejected steps; history_size bounds the
    number of stored steps a DDE keeps for its delayed lookups (default min(max_steps, 1024)).
    """
    solver = Tsit5() if solver is None else solver
    if not isinstance(solver, ExplicitRK):
        raise TypeError(f"solver must be an ExplicitRK such as Tsit5(), got {solver!r}")
    if not isinstance(prob, (ODEProblem, DDEProblem)):
        raise TypeError(f"prob must be an ODEProblem or DDEProblem, got {type(prob).__name__}")
    _check_positive("rtol", rtol)
    _check_positive("atol", atol)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    history_size = min(max_steps, 1024) if history_size is None else history_size
    if not isinstance(history_size, int) or history_size < 1:
        raise ValueError(f"history_size must be a positive int, got {history_size!r}")
    tab = solver.tableau
    if controller is None:
        controller = PIController() if (tab.adaptive and dt0 is None) or tab.adaptive else ConstantStepSize()
    if isinstance(controller, ConstantStepSize) or not tab.adaptive:
        if dt0 is None:
            raise ValueError(f"{tab.name} with constant steps needs dt0 (solve(..., dt0=...))")
        controller = ConstantStepSize()
    if dt0 is not None and _is_concrete(dt0) and not float(dt0) > 0:
        raise ValueError(f"dt0 must be positive, got {dt0!r}")

    y0 = prob.initial_state(p)
    dtype = y0.dtype if jnp.issubdtype(y0.dtype, jnp.floating) else jnp.result_type(float)
    y0 = y0.astype(dtype)
    t0, t1 = jnp.asarray(prob.t0, dtype), jnp.asarray(prob.t1, dtype)
    if _is_concrete(t0) and _is_concrete(t1) and not float(t1) > float(t0):
        raise ValueError(f"need t1 > t0, got t0={float(t0)!r}, t1={float(t1)!r}")
    saveat = jnp.reshape(t1, (1,)) if saveat is None else jnp.asarray(saveat, dtype)
    if saveat.ndim != 1 or saveat.shape[0] == 0:
        raise ValueError(f"saveat must be a non-empty 1-D array of times, got shape {saveat.shape}")
    bad_saveat = jnp.any(saveat < t0) | jnp.any(saveat > t1) | jnp.any(jnp.diff(saveat) <= 0)
    saveat = eqx.error_if(saveat, bad_saveat, "ndde: saveat must be strictly increasing and lie in [t0, t1].")

    if isinstance(prob, ODEProblem):
        rhs = _ode_rhs(prob, p, y0)
        bps, hist0 = None, None
    else:
        rhs, taus = _dde_rhs(prob, p, y0, t0)
        bps = breakpoint_times(t0, taus, tab.order + 1) if _track_breakpoints else None
        hist0 = _history.empty(history_size, tab.degree, y0)
    stops, stop_is_bp = stop_times(t0, t1, saveat if land_on_saveat else saveat[:0], bps)
    cfg = LoopConfig(tab, controller, max_steps, history_size, bool(land_on_saveat))
    final = integrate(cfg, rhs, y0, t0, t1, saveat, stops, stop_is_bp,
                      jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype), dt0, hist0)
    ys = eqx.branched_error_if(final.ys, final.status != OK, final.status,
                               _error_messages(max_steps, history_size))
    stats = {"steps": final.accepted, "rejected": final.rejected, "rhs_evals": final.rhs_evals}
    return Solution(ts=saveat, ys=ys, stats=stats)


def _check_rhs_shape(out, y0, what):
    if out.shape != y0.shape:
        raise ValueError(f"{what} returned shape {out.shape} but the state x has shape {y0.shape}; "
                         "they must match")


def _ode_rhs(prob: ODEProblem, p, y0) -> Rhs:
    out = jax.eval_shape(lambda: prob.rhs(jnp.zeros((), y0.dtype), y0, p))
    _check_rhs_shape(out, y0, "rhs(t, x, p)")
    return Rhs(eval=lambda hist, t, y, left: prob.rhs(t, y, p), cap=jnp.asarray(jnp.inf, y0.dtype),
               max_delay=jnp.zeros((), y0.dtype))


def _dde_rhs(prob: DDEProblem, p, y0, t0):
    taus = jnp.asarray(prob.delays(p))
    if taus.ndim != 1 or taus.shape[0] == 0:
        raise ValueError(f"delays(p) must return a 1-D array of m >= 1 delays, got shape {taus.shape}")
    taus = taus.astype(y0.dtype)
    if _is_concrete(taus):
        bad = np.asarray(taus)
        if not np.all(np.isfinite(bad) & (bad > 0)):
            raise ValueError(f"delays must be finite and > 0, got {bad.tolist()}")
    taus = eqx.error_if(taus, ~jnp.all(jnp.isfinite(taus) & (taus > 0)),
                        "ndde: non-positive or non-finite delay: delays(p) must return values > 0.")
    m = taus.shape[0]
    h_out = jax.eval_shape(lambda: jnp.asarray(prob.history(t0, p)))
    _check_rhs_shape(h_out, y0, "history(t, p)")
    lag_shape = (m,) + y0.shape
    out = jax.eval_shape(lambda: prob.rhs(t0, y0, jnp.zeros(lag_shape, y0.dtype), p))
    _check_rhs_shape(out, y0, "rhs(t, x, lagged, p)")
    history = lambda q: jnp.asarray(prob.history(q, p), y0.dtype)

    def evaluate(hist, t, y, left):
        qs = t - taus
        from_hist = jax.vmap(history)(qs)
        from_buf = jax.vmap(lambda q: _history.lookup(hist, q, left))(qs)
        in_hist = (qs <= t0) if left else (qs < t0)
        lagged = jnp.where(jnp.reshape(in_hist, (m,) + (1,) * y.ndim), from_hist, from_buf)
        return prob.rhs(t, y, lagged, p)

    cap = jax.lax.stop_gradient(jnp.min(taus))
    return Rhs(eval=evaluate, cap=cap, max_delay=jax.lax.stop_gradient(jnp.max(taus))), taus
