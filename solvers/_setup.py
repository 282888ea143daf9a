"""From a problem and p to what the loop needs: initial state, right-hand side with delayed
lookups, stops, history buffer. Shared by ``solve`` and every sensitivity."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _history
from ._breakpoints import breakpoint_times, saves_off_breakpoints, separating_shift, stop_times
from ._forward import LoopConfig, Rhs
from ._problem import DDEProblem, GradientField, ODEProblem


@dataclasses.dataclass(frozen=True)
class Options:
    tableau: Any
    controller: Any
    rtol: float
    atol: float
    max_steps: int
    dt0: Any
    history_size: int
    land_on_saveat: bool
    track_breakpoints: bool
    throw: bool = True
    separate_breakpoints: bool = True  # False: the delays depend on nothing traced (see solve_delays)
    # seen from the tracers at solve's call site (differentiation()), before solve compiles itself:
    # inside that program a jax.jvp or jax.grad applied outside it leaves no tracer
    forward_only: bool = False  # jax.jvp / jax.jacfwd of the solve: the plain loop, no custom VJP
    grad_differentiated: bool = False  # jax.grad under jax.jvp (a Hessian-vector product, jax.hessian)
    reverse: bool = False  # under jax.grad or jax.vjp (reverse mode)
    rounding_hint: str = ""  # added to the step budget and underflow errors when rtol is near eps
    dde: bool = False  # the step budget error says that a DDE's step is at most its smallest delay
    # capacity of a DDE adjoint's backward-sweep buffer (None: history_size). Its overflow shows
    # only in the backward pass, where solve cannot grow it and run again (see solve)
    sweep_history_size: int | None = None

    @property
    def on_error(self) -> str:
        """How equinox reports a failure: raise (through a host callback; EQX_ON_ERROR may
        change it) or, with throw=False, NaN in place of the checked value and no callback."""
        return "default" if self.throw else "nan"

    def loop_config(self):
        return LoopConfig(self.tableau, self.controller, self.max_steps, self.history_size, self.land_on_saveat)


class Built(NamedTuple):
    rhs: Rhs
    y0: jax.Array
    t0: jax.Array
    t1: jax.Array
    saveat: jax.Array
    stops: jax.Array
    stop_is_bp: jax.Array
    hist0: Any
    taus: Any  # delays (m,) for a DDE, None for an ODE
    rtol: jax.Array
    atol: jax.Array


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


try:  # JAX's tracers of jax.jvp and jax.grad (not public: without them, only concrete arrays count)
    from jax._src.interpreters.ad import JVPTracer, LinearizeTracer
    from jax._src.interpreters.partial_eval import JaxprTracer

    AD_TRACERS = (JVPTracer, LinearizeTracer)
except ImportError:
    JVPTracer = LinearizeTracer = JaxprTracer = ()
    AD_TRACERS = ()


def differentiation(tree) -> tuple[int, bool]:
    """(depth, forward_only). depth: how many differentiation tracers (jax.jvp's, jax.linearize's
    and jax.grad's) the most deeply differentiated array of ``tree`` sits under, looking through
    vmap's: 1 inside jax.grad or jax.jvp, 2 inside jax.grad under jax.jvp (a Hessian-vector
    product, jax.hessian). forward_only: there is at least one and every one is jax.jvp's
    (jax.jvp, jax.jacfwd), none a reverse-mode linearization."""
    depth, kinds = 0, set()
    for leaf in jax.tree_util.tree_leaves(tree):
        n, a = 0, leaf
        while isinstance(a, jax.core.Tracer):
            if isinstance(a, AD_TRACERS):
                n += 1  # a JVP tracer with a staged tangent is an older JAX's jax.grad
                pure = isinstance(a, JVPTracer) and not isinstance(a.tangent, JaxprTracer)
                kinds.add("jvp" if pure else "linearize")
            a = getattr(a, "primal", getattr(a, "val", None))
        depth = max(depth, n)
    return depth, kinds == {"jvp"}


def initial_state(prob, p):
    y0 = prob.initial_state(p)
    if jnp.issubdtype(y0.dtype, jnp.complexfloating):
        raise TypeError(f"the initial state is {y0.dtype}: ndde integrates real states (its error norm and step "
                        "control are real); stack the real and imaginary parts into one real state instead")
    if y0.dtype in (jnp.float16, jnp.bfloat16):
        raise TypeError(f"the initial state is {y0.dtype}: ndde's error control needs float32 or float64 (half "
                        "precision keeps 3 significant digits and its squared error norm overflows at 65504, so "
                        "the step control breaks down); give x0 as float32 and cast inside rhs for half-precision "
                        "arithmetic")
    dtype = y0.dtype if jnp.issubdtype(y0.dtype, jnp.floating) else jnp.result_type(float)
    return y0.astype(dtype)


def check_output(out, y0, what):
    """``out`` (what rhs or history returned) must have the state's shape and a dtype that
    does not promote the state's (a float32 output in a float64 solve is fine)."""
    if not isinstance(out, jax.ShapeDtypeStruct | jax.Array):
        raise TypeError(f"{what} must return one array of the state's shape {y0.shape}, got "
                        f"{type(out).__name__}: flatten a pytree into one array")
    if out.shape != y0.shape:
        raise ValueError(f"{what} returned shape {out.shape} but the state x has shape {y0.shape}; "
                         "they must match")
    if jnp.issubdtype(out.dtype, jnp.complexfloating):
        raise TypeError(f"{what} returned dtype {out.dtype}: ndde integrates real states; stack the real and "
                        "imaginary parts into one real state instead")
    if jnp.promote_types(out.dtype, y0.dtype) != y0.dtype:
        raise TypeError(f"{what} returned dtype {out.dtype} but the state x is {y0.dtype}; return "
                        f"{y0.dtype} (e.g. out.astype(x.dtype)) or give the initial state as {out.dtype}")


def fail_if(x, pred, msgs, on_error, index=None):
    """equinox's error_if (branched_error_if with an index into msgs), except with on_error="nan"
    (throw=False): there only the failing trajectories of a vmapped batch become NaN. equinox's
    own "nan" reduces pred over the batch (unvmap_any), so one failed trajectory made every
    trajectory's ys and gradient NaN. The "nan" form broadcasts each leaf of x to pred's batch:
    in a custom_vjp's backward rule, never give it the cotangent of an input vmap may leave
    unbatched (a shared parameter), which JAX would then sum over the batch."""
    if on_error == "nan":
        bad = jnp.any(pred)
        nan_where_bad = lambda a: (jnp.where(bad, jnp.asarray(jnp.nan, a.dtype), a)
                                   if jnp.issubdtype(a.dtype, jnp.inexact) else a)
        return jax.tree_util.tree_map(nan_where_bad, x)
    if index is None:
        return eqx.error_if(x, pred, msgs, on_error=on_error)
    return eqx.branched_error_if(x, pred, index, msgs, on_error=on_error)


def delays_of(prob: DDEProblem, p, dtype, on_error="default"):
    """The delays as a 1-D array of ``dtype``, checked > 0 (on_error="off" where the same
    delays were checked already)."""
    taus = jnp.asarray(prob.delays(p))
    if taus.ndim != 1 or taus.shape[0] == 0:
        raise ValueError(f"delays(p) must return a 1-D array of m >= 1 delays, got shape {taus.shape}")
    taus = taus.astype(dtype)
    if is_concrete(taus):
        values = np.asarray(taus)
        if not np.all(np.isfinite(values) & (values > 0)):
            raise ValueError(f"delays must be finite and > 0, got {values.tolist()}")
    return fail_if(taus, ~jnp.all(jnp.isfinite(taus) & (taus > 0)),
                   "ndde: non-positive or non-finite delay: delays(p) must return values > 0.", on_error)


def solve_delays(prob: DDEProblem, p, dtype, opts: Options, on_error="default"):
    """(delays the solve uses, their shift from delays(p)): delays(p) moved apart where two of
    their breakpoints would coincide (see _breakpoints.separating_shift); the shift carries no
    derivative, so d/dp is that of delays(p). Delays that depend on nothing traced where
    ``solve`` was called (opts.separate_breakpoints False) are used as they are: they have no
    derivative, and one landing serves coinciding breakpoints (each landing of its own costs a
    step: 8 evenly spaced delays on [0, 3] take 819 steps instead of 49)."""
    taus = delays_of(prob, p, dtype, on_error)
    if not (opts.track_breakpoints and opts.separate_breakpoints):
        return taus, jnp.zeros_like(taus)
    t0, t1 = jnp.asarray(prob.t0, dtype), jnp.asarray(prob.t1, dtype)
    shift = jax.lax.stop_gradient(separating_shift(taus, t0, t1, opts.tableau.order + 1,
                                                   _history.side_tolerance(t0, t1)))
    return taus + shift, shift


def lagged_values(prob: DDEProblem, p, taus, t0, hist, t, left, like):
    """x(t - τ_j) for every j: the history before t0, the stored dense output after it.
    ``left`` chooses the side at a boundary (see _history.lookup)."""
    m = taus.shape[0]
    qs = t - taus
    history = lambda q: jnp.asarray(prob.history(q, p), like.dtype)
    from_hist = jax.vmap(history)(qs)
    from_buf = jax.vmap(lambda q: _history.lookup(hist, q, left))(qs)
    in_hist = ~_history.before(t0, qs, left, _history.side_tolerance(qs, t, t0))  # qs <= t0 (left), qs < t0 (right)
    return jnp.where(jnp.reshape(in_hist, (m,) + (1,) * like.ndim), from_hist, from_buf)


def unified_rhs(prob):
    """rhs(t, x, lagged, p) for both problem kinds (an ODE ignores ``lagged``)."""
    if isinstance(prob, ODEProblem):
        return lambda t, x, lagged, p: prob.rhs(t, x, p)
    return prob.rhs


def build(prob, p, saveat, opts: Options, *, keep_all=False, ring=False, capacity=None) -> Built:
    """keep_all: record the dense output of every step (also for an ODE), never evicting.
    ring: an ODE also keeps its last steps in a history buffer (evicting freely).
    capacity: history buffer size."""
    y0 = initial_state(prob, p)
    dtype = y0.dtype
    t0, t1 = jnp.asarray(prob.t0, dtype), jnp.asarray(prob.t1, dtype)
    capacity = opts.history_size if capacity is None else capacity
    keep_from = jnp.asarray(-jnp.inf, dtype) if keep_all else None
    if isinstance(prob, ODEProblem):
        if isinstance(prob.rhs, GradientField):
            prob.rhs.check(y0, p)
        out = jax.eval_shape(lambda: prob.rhs(jnp.zeros((), dtype), y0, p))
        check_output(out, y0, "rhs(t, x, p)")
        rhs = Rhs(eval=lambda hist, t, y, left: prob.rhs(t, y, p), cap=jnp.asarray(jnp.inf, dtype),
                  max_delay=jnp.zeros((), dtype), keep_from=keep_from)
        taus, bps = None, None
        hist0 = _history.empty(capacity, opts.tableau.degree, y0) if keep_all or ring else None
    else:
        taus, _ = solve_delays(prob, p, dtype, opts, opts.on_error)
        check_output(jax.eval_shape(lambda: jnp.asarray(prob.history(t0, p))), y0, "history(t, p)")
        lag_shape = (taus.shape[0],) + y0.shape
        out = jax.eval_shape(lambda: prob.rhs(t0, y0, jnp.zeros(lag_shape, dtype), p))
        check_output(out, y0, "rhs(t, x, lagged, p)")

        def lookups(hist, t, left):
            return lagged_values(prob, p, taus, t0, hist, t, left, y0)

        def evaluate(hist, t, y, left, looked=None):
            return prob.rhs(t, y, lookups(hist, t, left) if looked is None else looked, p)

        rhs = Rhs(eval=evaluate, cap=jax.lax.stop_gradient(jnp.min(taus)),
                  max_delay=jax.lax.stop_gradient(jnp.max(taus)), keep_from=keep_from, lookups=lookups)
        bps = breakpoint_times(t0, taus, opts.tableau.order + 1) if opts.track_breakpoints else None
        hist0 = _history.empty(capacity, opts.tableau.degree, y0)
    land = saveat if opts.land_on_saveat else saveat[:0]
    if bps is not None:
        land = saves_off_breakpoints(land, bps, t0, t1)
    stops, stop_is_bp = stop_times(t0, t1, land, bps)
    return Built(rhs, y0, t0, t1, saveat, stops, stop_is_bp, hist0, taus, jnp.asarray(opts.rtol, dtype),
                 jnp.asarray(opts.atol, dtype))
