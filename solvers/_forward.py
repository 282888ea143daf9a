"""The forward integration loop (a ``lax.while_loop``) shared by ODEs and DDEs.

Each iteration attempts one step from t: it is clipped to the next stop (breakpoint,
save time or t1) and, for a DDE, capped at the smallest delay, so that every delayed
lookup of the step reads already accepted dense output (the documented alternative to
fixed-point iteration on the current step). Step sizes chosen by the controller carry no
derivative; a step that ends on a stop has size ``stop - t`` and keeps its dependence on
the stop (hence on learned delays).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _history
from ._controller import error_norm, initial_step
from ._step import rk_step
from ._tableau import ButcherTableau

OK, MAX_STEPS, UNDERFLOW, NONFINITE, HISTORY_FULL = range(5)


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
    accepted: jax.Array
    rejected: jax.Array
    rhs_evals: jax.Array
    status: jax.Array


class Rhs(NamedTuple):
    """How to evaluate the right-hand side given the loop state's history."""

    eval: Callable  # eval(hist, t, y, left) -> dy
    cap: Any  # largest step allowed (smallest delay, or +inf)
    max_delay: Any  # how far back lookups reach (0 for an ODE)


def integrate(cfg: LoopConfig, rhs: Rhs, y0, t0, t1, saveat, stops, stop_is_bp,
              rtol, atol, dt0, hist0):
    tab = cfg.tableau
    dtype = y0.dtype
    n_save = saveat.shape[0]
    k1 = rhs.eval(hist0, t0, y0, False)
    evals = 1
    if dt0 is None:
        h0 = initial_step(k1, y0, t0, t1 - t0, tab.order, rtol, atol, rhs.cap,
                          lambda t, y: rhs.eval(hist0, t, y, True))
        evals += 1
    else:
        h0 = jnp.asarray(dt0, dtype)
    ys = jnp.zeros((n_save,) + y0.shape, dtype)
    at_t0 = saveat[0] == t0
    ys = ys.at[0].set(jnp.where(at_t0, y0, ys[0]))
    state = LoopState(
        t=t0, y=y0, k1=k1, h=lax.stop_gradient(h0), prev_err=cfg.controller.init_state(dtype),
        last_rejected=jnp.asarray(False), nonfinite=jnp.asarray(False), ys=ys,
        save_idx=at_t0.astype(jnp.int32), hist=hist0, accepted=jnp.zeros((), jnp.int32),
        rejected=jnp.zeros((), jnp.int32), rhs_evals=jnp.asarray(evals, jnp.int32),
        status=jnp.asarray(OK, jnp.int32))
    h_default = lax.stop_gradient(h0)

    def cond(st):
        return (st.t < t1) & (st.status == OK)

    def body(st: LoopState) -> LoopState:
        t, y = st.t, st.y
        i = jnp.searchsorted(stops, t, side="right")
        stop, stop_bp = stops[i], stop_is_bp[i]
        h_try = jnp.minimum(st.h, rhs.cap)
        land = (stop - t) <= jnp.minimum(1.01 * h_try, rhs.cap)
        h = jnp.where(land, stop - t, h_try)
        t_next = jnp.where(land, stop, t + h)
        step = rk_step(tab, lambda s, z: rhs.eval(st.hist, s, z, True), t, y, h, st.k1)
        y1 = step.y1
        finite = jnp.all(jnp.isfinite(y1))
        err = error_norm(step.err, y, y1, rtol, atol) if tab.adaptive else jnp.where(finite, 0.0, jnp.inf)
        accept, h_new, prev_err = cfg.controller.adapt(h, h_default, err, st.last_rejected,
                                                       st.prev_err, tab.error_order or tab.order)
        accept = accept & finite
        h_new = jnp.where(accept & land, jnp.maximum(h_new, st.h), h_new)
        h_new = lax.stop_gradient(h_new)

        t_new = jnp.where(accept, t_next, t)
        y_new = jnp.where(accept, y1, y)
        hist, hist_ok = st.hist, jnp.asarray(True)
        if hist is not None:
            pushed, hist_ok = _history.push(hist, t, t_next, step.coeffs, t_next - rhs.max_delay)
            hist = jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), pushed, hist)
            hist_ok = hist_ok | ~accept

        if tab.fsal:
            recompute = accept & land & stop_bp & (hist is not None)
            k1 = lax.cond(recompute, lambda: rhs.eval(hist, t_new, y_new, False), lambda: step.k_last)
            k1 = jnp.where(accept, k1, st.k1)
            evals = tab.stages - 1 + recompute.astype(jnp.int32)
        else:
            k1 = rhs.eval(hist, t_new, y_new, False)
            evals = tab.stages

        if cfg.land_on_saveat:
            j = jnp.minimum(st.save_idx, n_save - 1)
            hit = accept & (st.save_idx < n_save) & (t_next == saveat[j])
            ys = st.ys.at[j].set(jnp.where(hit, y1, st.ys[j]))
            save_idx = st.save_idx + hit.astype(jnp.int32)
        else:
            ys, save_idx = _save_interpolated(st.ys, st.save_idx, saveat, accept, t, t_next, step.coeffs)

        accepted = st.accepted + accept.astype(jnp.int32)
        rejected = st.rejected + (~accept).astype(jnp.int32)
        tiny = 4 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(t), jnp.abs(t1))
        status = jnp.where(accepted + rejected >= cfg.max_steps, MAX_STEPS, OK)
        status = jnp.where(~accept & (h_new <= tiny), jnp.where(finite, UNDERFLOW, NONFINITE), status)
        if not tab.adaptive:
            status = jnp.where(finite, status, NONFINITE)
        status = jnp.where(hist_ok, status, HISTORY_FULL)
        status = jnp.where((t_new >= t1) & (status == MAX_STEPS), OK, status)
        return LoopState(
            t=t_new, y=y_new, k1=k1, h=h_new, prev_err=jnp.where(accept, prev_err, st.prev_err),
            last_rejected=~accept, nonfinite=~finite, ys=ys, save_idx=save_idx,
            hist=hist, accepted=accepted, rejected=rejected, rhs_evals=st.rhs_evals + evals,
            status=status.astype(jnp.int32))

    return lax.while_loop(cond, body, state)



def _save_interpolated(ys, save_idx, saveat, accept, t_a, t_b, coeffs):
    """Write the dense output at every save time in (t_a, t_b] of an accepted step."""
    n_save = saveat.shape[0]

    def pending(c):
        i, _ = c
        return accept & (i < n_save) & (saveat[jnp.minimum(i, n_save - 1)] <= t_b)

    def write(c):
        i, ys = c
        theta = (saveat[i] - t_a) / (t_b - t_a)
        return i + 1, ys.at[i].set(_history.horner(coeffs, theta))

    save_idx, ys = lax.while_loop(pending, write, (save_idx, ys))
    return ys, save_idx
