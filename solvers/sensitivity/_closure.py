"""Arrays held by the problem itself (an x0 array, a vmapped initial state, arrays inside an
equinox-module rhs, values a problem function captured from an enclosing vmap or grad) are
explicit inputs of the sensitivities' custom_vjp, never closed over: a closed-over tracer of
vmap or grad would leak out of the backward pass.

Those being differentiated (e.g. ``jax.grad`` with respect to an x0 array) are lifted into
the parameters: the backward pass then sees a problem whose parameters are (p, diff) and
returns their gradients exactly as for p.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero, custom_vjp_primal_tree_values

from .._problem import DDEProblem, GradientField, ODEProblem


def split(prob, p):
    """(arrays, static): the problem's array leaves (explicit custom_vjp inputs) and the rest,
    after ``captured_as_leaves``."""
    return eqx.partition(captured_as_leaves(prob, p), eqx.is_array)


class _Converted(eqx.Module):
    """A problem callable traced once into a jaxpr whose captured values are array leaves
    (equinox's closure conversion). Array arguments are cast to the traced dtypes (a Python
    float t, say); any other difference in the arguments is the conversion's own error."""

    fn: eqx.Module

    def __call__(self, *args):
        like = self.fn.in_struct[0]
        cast = lambda a, s: jnp.asarray(a, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else a
        return self.fn(*jax.tree_util.tree_map(cast, args, like))


def _without_tracers(fn, *example):
    """``fn`` itself when it captures no JAX tracer, else its converted form."""
    if fn is None or not callable(fn):
        return fn
    converted = eqx.filter_closure_convert(fn, *example)
    consts = getattr(converted, "consts", ())
    if not any(isinstance(c, jax.core.Tracer) for c in jax.tree_util.tree_leaves(consts)):
        return fn
    return _Converted(converted)


def captured_as_leaves(prob, p):
    """The problem with every callable that captures a JAX tracer (a value being vmapped or
    differentiated, which a Python function closed over) replaced by a converted form holding
    that value as an array leaf. The custom_vjp rules then receive it as an explicit input
    instead of leaking the tracer, and a differentiated one gets its gradient (as the problem's
    own arrays do, see the module docstring)."""
    from .._setup import delays_of, initial_state

    # example arguments as shapes only: tracing the conversion runs no op of the problem's functions
    y0 = jax.eval_shape(lambda: initial_state(prob, p))
    t = jax.ShapeDtypeStruct((), y0.dtype)
    x0 = _without_tracers(prob.x0, p)
    if isinstance(prob, ODEProblem):
        if isinstance(prob.rhs, GradientField):
            rhs = eqx.tree_at(lambda g: (g.H, g.extra), prob.rhs,
                              (_without_tracers(prob.rhs.H, y0, p), _without_tracers(prob.rhs.extra, t, y0, p)),
                              is_leaf=lambda v: v is None)
        else:
            rhs = _without_tracers(prob.rhs, t, y0, p)
        return ODEProblem(rhs, x0, prob.t0, prob.t1)
    m = jax.eval_shape(lambda: delays_of(prob, p, y0.dtype)).shape[0]
    lagged = jax.ShapeDtypeStruct((m,) + y0.shape, y0.dtype)
    return DDEProblem(_without_tracers(prob.rhs, t, y0, lagged, p), _without_tracers(prob.history, t, p),
                      _without_tracers(prob.delays, p), prob.t0, prob.t1, x0)


def by_perturbation(arrays, static):
    """In a ``symbolic_zeros`` forward rule: (diff, const), the array leaves being differentiated
    and the others (None in place of the leaves of the other tree)."""
    prob = eqx.combine(arrays, static)
    for name in ("t0", "t1"):
        value = getattr(prob, name)
        refuse_time_derivative(prob, name, isinstance(value, CustomVJPPrimal) and value.perturbed)
    is_primal = lambda x: isinstance(x, CustomVJPPrimal)
    diff = jax.tree_util.tree_map(lambda c: c.value if c.perturbed else None, arrays, is_leaf=is_primal)
    const = jax.tree_util.tree_map(lambda c: None if c.perturbed else c.value, arrays, is_leaf=is_primal)
    return diff, const


def saveat_perturbed(saveat, prob) -> bool:
    """In a ``symbolic_zeros`` forward rule: whether the save times are differentiated. For an ODE
    their cotangent is exact (``saveat_cotangent``); a DDE's x' may jump at a save time (a
    breakpoint), so there it is refused rather than returned as a silent zero."""
    perturbed = isinstance(saveat, CustomVJPPrimal) and saveat.perturbed
    refuse_time_derivative(prob, "saveat", perturbed)
    return perturbed


def refuse_time_derivative(prob, name, moves: bool):
    """The error for a derivative ForwardMode and the continuous adjoints do not give: with
    respect to the problem's t0 or t1 (name), or a DDE's save times (name "saveat")."""
    if moves and name in ("t0", "t1"):
        raise ValueError(f"ndde: differentiating with respect to the problem's {name} is not supported "
                         "by ForwardMode or the continuous adjoints; use sensitivity=Backprop()")
    if moves and name == "saveat" and isinstance(prob, DDEProblem):
        raise ValueError("ndde: differentiating a DDE's solution with respect to the save times is not supported "
                         "by ForwardMode or the continuous adjoints; use sensitivity=Backprop()")


def saveat_cotangent(prob, p, saveat, ys, ct_ys):
    """d ys[k] / d saveat[k] = x'(t_k) = f(t_k, ys[k], p) (an ODE's exact derivative; every
    other save is unaffected), contracted with the cotangent of ys; zeros when ``ys`` is None
    (the forward rule kept no ys: the save times were not differentiated)."""
    if ys is None:
        return jnp.zeros_like(saveat)
    return jnp.sum((ct_ys * save_slopes(prob, p, saveat, ys)).reshape(saveat.shape[0], -1), axis=1)


def save_slopes(prob, p, saveat, ys):
    """x'(t_k) = f(t_k, ys[k], p) at each save time of an ODE: d ys[k] / d saveat[k]."""
    return jax.vmap(lambda t, y: prob.rhs(t, y, p))(saveat, ys)


def values(tree):
    """Strip the perturbation records of a ``symbolic_zeros`` forward rule's argument."""
    return custom_vjp_primal_tree_values(tree)


def instantiate(ct):
    """A cotangent that may be a symbolic zero, as an array."""
    return jnp.zeros(ct.shape, ct.dtype) if isinstance(ct, SymbolicZero) else ct


def dtypes_of(tree):
    return jax.tree_util.tree_map(jnp.result_type, tree)


def cast_like(cotangent, dtypes):
    """``cotangent`` in the floating dtypes of ``dtypes`` (dtypes_of the primal arguments): the
    backward passes compute in the state's dtype (ravel_pytree promotes too), and jax.grad of a
    float32 leaf must be float32. None and float0 (integer) cotangents are left alone."""
    cast = lambda c, d: c.astype(d) if c is not None and jnp.issubdtype(d, jnp.inexact) else c
    return jax.tree_util.tree_map(cast, cotangent, dtypes, is_leaf=lambda c: c is None)


def cotangents(grad_p, ct_saveat, grad_diff, const, dtypes):
    """What a solve's custom_vjp returns for (p, saveat, the problem's arrays): the differentiated
    arrays' gradient with zeros for the constant ones, each in its primal's dtype."""
    return cast_like((grad_p, ct_saveat, eqx.combine(grad_diff, zero_cotangents(const))), dtypes)


def has_diff(diff) -> bool:
    return bool(jax.tree_util.tree_leaves(diff))


def rebuild(diff, const, static):
    return eqx.combine(diff, const, static)


def lifted(diff, const, static):
    """The same problem with parameters P = (p, diff): every function reads diff from P."""
    full = lambda P: rebuild(P[1], const, static)
    prob = rebuild(diff, const, static)
    if isinstance(prob, ODEProblem):
        return ODEProblem(lambda t, x, P: full(P).rhs(t, x, P[0]), lambda P: full(P).initial_state(P[0]),
                          prob.t0, prob.t1)
    x0 = None if prob.x0 is None else (lambda P: full(P).initial_state(P[0]))
    return DDEProblem(lambda t, x, lag, P: full(P).rhs(t, x, lag, P[0]), lambda t, P: full(P).history(t, P[0]),
                      lambda P: full(P).delays(P[0]), prob.t0, prob.t1, x0)


def zero_cotangents(tree):
    """Zero cotangents of the same structure (float0 for integer arrays)."""
    def zero(a):
        if isinstance(a, SymbolicZero) or jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)
    return jax.tree_util.tree_map(zero, tree)
