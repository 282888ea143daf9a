"""Problem definitions: what to integrate, independent of how."""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from ._precision import HIGHEST


class ODEProblem(eqx.Module):
    """dx/dt = rhs(t, x, p) on [t0, t1], x(t0) = x0 (an array, or a callable x0(p))."""

    rhs: Callable
    x0: Any
    t0: Any
    t1: Any

    def __check_init__(self):
        _check_callables(self, ("rhs",))

    def initial_state(self, p):
        return _as_state(self.x0(p) if callable(self.x0) else self.x0, "x0")


class DDEProblem(eqx.Module):
    """dx/dt = rhs(t, x, lagged, p) with lagged[j] = x(t - delays(p)[j]).

    ``history(t, p)`` gives x for t <= t0; ``delays(p)`` a 1-D array of m > 0 constant
    lags (m static, values may be traced and learned); ``x0`` is None (meaning
    history(t0, p)), an array, or a callable x0(p). ``x0`` may differ from the history's
    value at t0: the solver then also lands on t0 + tau_j, where x' jumps.
    """

    rhs: Callable
    history: Callable
    delays: Callable
    t0: Any
    t1: Any
    x0: Any = None

    def __check_init__(self):
        _check_callables(self, ("rhs", "history", "delays"))
        if isinstance(self.rhs, GradientField):
            raise TypeError("DDEProblem: a GradientField is an ODE right-hand side (dx/dt = J ∇H(x, p)); a DDE's "
                            "rhs(t, x, lagged, p) is a function: call jax.grad inside it")

    def initial_state(self, p):
        if self.x0 is None:
            return _as_state(self.history(jnp.asarray(self.t0), p), "history(t0, p)")
        return _as_state(self.x0(p) if callable(self.x0) else self.x0, "x0")


def _check_callables(prob, names):
    for name in names:
        if not callable(getattr(prob, name)):
            raise TypeError(f"{type(prob).__name__}: {name} must be a function, got "
                            f"{type(getattr(prob, name)).__name__} {getattr(prob, name)!r}")


def _as_state(value, what):
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be one array (ndde integrates a single array state), got "
                        f"{type(value).__name__}: flatten a pytree state with jax.flatten_util.ravel_pytree "
                        "and unflatten it inside rhs") from None


class GradientField(eqx.Module):
    """A structured right-hand side dx/dt = J ∇ₓH(x, p) (+ extra(t, x, p)).

    ``H(x, p)`` returns a scalar (sum over a batch yourself when x is (B, d));
    ``J`` is a (d, d) matrix applied along the last axis of x. Use it as the ``rhs`` of
    an ODEProblem. The sensitivities recognise it and compute the adjoint's
    vector–Jacobian product as one forward-over-reverse pass (DESIGN.md, Nested AD).
    """

    H: Callable
    J: Any
    extra: Callable | None = None
    adjoint_vjp: str = eqx.field(default="reverse-over-reverse", static=True)

    def __check_init__(self):
        allowed = ("forward-over-reverse", "reverse-over-reverse")
        if self.adjoint_vjp not in allowed:
            raise ValueError(f"GradientField: adjoint_vjp must be one of {allowed}, got {self.adjoint_vjp!r}")
        if not callable(self.H) or not (self.extra is None or callable(self.extra)):
            raise TypeError(f"GradientField: H must be a function H(x, p) and extra None or a function "
                            f"extra(t, x, p), got H={self.H!r}, extra={self.extra!r}")

    def check(self, x, p):
        """Errors that name J or H when they do not fit the state x (JAX's own name neither)."""
        d = x.shape[-1] if x.ndim else None
        if x.ndim == 0 or jnp.shape(self.J) != (d, d):
            raise ValueError(f"GradientField: J must be a (d, d) matrix with d = x.shape[-1] = {d}, got shape "
                             f"{jnp.shape(self.J)}")
        h = jax.eval_shape(lambda: self.H(x, p))  # p closed over: settings stay Python values
        if h.shape != ():
            raise ValueError(f"GradientField: H(x, p) must return a scalar (sum over a batch of states "
                             f"yourself), got shape {h.shape}")
        if self.extra is not None:
            e = jax.eval_shape(lambda: self.extra(jnp.zeros((), x.dtype), x, p))
            if getattr(e, "shape", None) != x.shape:  # a (1,) output would broadcast silently
                raise ValueError(f"GradientField: extra(t, x, p) must return the state's shape {x.shape}, got "
                                 f"{getattr(e, 'shape', type(e).__name__)}")

    def vjp_with(self, t, x, p, lam):
        """(f, f_xᵀλ, f_pᵀλ) by one forward-over-reverse pass: the jvp of x ↦ (∇ₓH, ∇_pH) in
        the direction v = Jᵀλ gives ∇²ₓH v and ∇_p(∇ₓH·v) together (DESIGN.md, Nested AD)."""
        J = jnp.asarray(self.J, x.dtype)
        v = jnp.matmul(lam, J, precision=HIGHEST)
        grads = lambda x, p: jax.grad(self.H, argnums=(0, 1))(x, p)
        zero_p = jax.tree_util.tree_map(jnp.zeros_like, p)
        (gx, _), (hx, hp) = jax.jvp(grads, (x, p), (v, zero_p))
        f = jnp.matmul(gx, J.T, precision=HIGHEST)
        if self.extra is not None:
            fe, vjp = jax.vjp(lambda x, p: self.extra(t, x, p), x, p)
            ex, ep = vjp(lam)
            f, hx = f + fe, hx + ex
            hp = jax.tree_util.tree_map(jnp.add, hp, ep)
        return f, hx, hp

    def __call__(self, t, x, p):
        return self.field(t, x, p)

    def field(self, t, x, p):
        grad_h = jax.grad(self.H, argnums=0)(x, p)
        out = jnp.matmul(grad_h, jnp.asarray(self.J, grad_h.dtype).T, precision=HIGHEST)
        if self.extra is not None:
            out = out + self.extra(t, x, p)
        return out


def canonical_hamiltonian_j(d: int) -> jnp.ndarray:
    """The symplectic J = [[0, I], [-I, 0]] for a state (q, p) of even size d."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2:
        raise ValueError(f"canonical J needs an even state size d >= 2, got d={d!r}")
    n = d // 2
    eye = jnp.eye(n)
    zero = jnp.zeros((n, n))
    return jnp.block([[zero, eye], [-eye, zero]])


def map_functions(prob, wrap):
    """``prob`` with each of its functions (rhs, history, delays, a callable x0) replaced by
    wrap(fn); a GradientField's H and extra are replaced inside it, so that the adjoints still
    recognise the field."""
    w = lambda fn: wrap(fn) if callable(fn) else fn
    rhs = prob.rhs
    if isinstance(rhs, GradientField):
        rhs = eqx.tree_at(lambda g: (g.H, g.extra), rhs, (w(rhs.H), w(rhs.extra)), is_leaf=lambda v: v is None)
    else:
        rhs = w(rhs)
    if isinstance(prob, ODEProblem):
        return ODEProblem(rhs, w(prob.x0), prob.t0, prob.t1)
    return DDEProblem(rhs, w(prob.history), w(prob.delays), prob.t0, prob.t1, w(prob.x0))


class _WithSettings(eqx.Module):
    """``fn`` with the leaves of p that are not floating-point arrays put back into its last
    argument, p."""

    fn: Callable
    settings: Any

    def __call__(self, *args):
        return self.fn(*args[:-1], eqx.combine(args[-1], self.settings))


def split_settings(prob, p):
    """(prob, p) for ForwardMode and the continuous adjoints: p reduced to its floating-point
    arrays, the parameters (a Python float becomes one: their custom VJP gets it as an array, and
    a function's closure conversion traced with the float failed on it); the other leaves (an
    int, a bool, a string: settings) move into the problem's functions. Those methods
    differentiate every leaf they are given, and failed on an int deep inside JAX."""
    params, settings = eqx.partition(floats_as_arrays(p), eqx.is_inexact_array)
    if not jax.tree_util.tree_leaves(settings):
        return prob, params
    return map_functions(prob, lambda fn: _WithSettings(fn, settings)), params


def floats_as_arrays(p):
    """p with each Python float a (weakly typed) JAX array."""
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v) if isinstance(v, float) else v, p)
