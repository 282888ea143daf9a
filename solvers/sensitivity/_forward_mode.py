"""ForwardMode: forward sensitivities through the solver.

The forward loop is a ``lax.while_loop``, which JAX differentiates in forward mode. The solve
is a custom_jvp whose rule computes the Jacobian dys/dP with respect to every input P that
carries a tangent (one jvp per entry, batched by ``jax.jacfwd``, from primal values only) and
returns its product with the tangents. That product is linear, so JAX transposes it for
``jax.grad`` (the cotangent contracted with the Jacobian), and ``jax.linearize`` evaluates it:
ForwardMode is the one method whose solve ``jax.linearize`` and forward-mode libraries
(optimistix's least squares with ``jac="fwd"``) can differentiate. A custom_vjp cannot be
linearized. Cost grows with the size of p.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from .._precision import HIGHEST
from . import _closure


def _is_zero(t) -> bool:
    """A tangent that carries nothing: a symbolic zero, or float0 (an integer input's)."""
    return isinstance(t, SymbolicZero) or getattr(t, "dtype", None) == jax.dtypes.float0


def _split_by_tangent(values, tangents):
    """(moving, still): the leaves of ``values`` whose tangent is not a symbolic zero, and the
    others (None in place of the leaves of the other tree)."""
    moving = jax.tree_util.tree_map(lambda v, t: None if _is_zero(t) else v, values, tangents, is_leaf=_is_zero)
    still = jax.tree_util.tree_map(lambda v, t: v if _is_zero(t) else None, values, tangents, is_leaf=_is_zero)
    return moving, still


def _refuse_time_tangents(arrays, tangents, static, saveat_moves):
    prob = eqx.combine(arrays, static)
    moved = eqx.combine(tangents, static, is_leaf=_is_zero)
    for name in ("t0", "t1"):
        _closure.refuse_time_derivative(prob, name, isinstance(getattr(prob, name), jax.Array)
                                        and not _is_zero(getattr(moved, name)))
    _closure.refuse_time_derivative(prob, "saveat", saveat_moves)


def _contract(jac, tangents):
    """Σ over leaves of jac_leaf · tangent_leaf (jac_leaf: ys.shape + leaf.shape)."""
    terms = [jnp.tensordot(J, t.astype(J.dtype), axes=t.ndim, precision=HIGHEST)
             for J, t in zip(jax.tree_util.tree_leaves(jac), jax.tree_util.tree_leaves(tangents))]
    return sum(terms[1:], terms[0])


def forward_mode_solve(prob, p, saveat, opts):
    from .._solve import check_gradient, check_status, forward_solve, recorded_decisions, stats_of

    arrays, static = _closure.split(prob, p)  # the problem's own arrays travel as explicit inputs

    def outputs(prob, p, saveat, replay=None):
        final, _ = forward_solve(prob, p, saveat, opts, replay=replay)
        return (check_status(final.ys, final.status, opts), stats_of(final)), final.status

    @jax.custom_jvp
    def solve_fm(p, saveat, arrays):
        return outputs(eqx.combine(arrays, static), p, saveat)[0]

    def jvp(primals, tangents):
        p, saveat, arrays = primals
        tp, tsaveat, tarrays = tangents
        _refuse_time_tangents(arrays, tarrays, static, not _is_zero(tsaveat))
        p_moving, p_still = _split_by_tangent(p, tp)
        diff, const = _split_by_tangent(arrays, tarrays)
        moving = (p_moving, diff)

        # a DDE's tangents follow the decisions of the plain solve that Backprop replays too
        replay = recorded_decisions(eqx.combine(arrays, static), p, saveat, opts) if opts.dde else None

        def solve(P):
            out, status = outputs(_closure.rebuild(P[1], const, static), eqx.combine(P[0], p_still), saveat, replay)
            return out[0], (out, status)

        if jax.tree_util.tree_leaves(moving):
            jac, (out, status) = jax.jacfwd(solve, has_aux=True)(moving)  # P jvps, batched
            jac = check_gradient(jac, status, opts)  # a failed solve or a non-finite derivative is an error
            ys_dot = _contract(jac, _split_by_tangent((tp, tarrays), (tp, tarrays))[0])
        else:  # only the save times move
            out, status = solve(moving)[1]
            ys_dot = check_gradient(jnp.zeros_like(out[0]), status, opts)
        ys = out[0]
        if not _is_zero(tsaveat):  # an ODE's d ys[k] / d saveat[k]
            slopes = _closure.save_slopes(_closure.rebuild(diff, const, static), p, saveat, ys)
            ys_dot = ys_dot + slopes * tsaveat.astype(ys.dtype).reshape((-1,) + (1,) * (ys.ndim - 1))
        stats_dot = jax.tree_util.tree_map(lambda s: np.zeros(np.shape(s), jax.dtypes.float0), out[1])
        return out, (ys_dot.astype(ys.dtype), stats_dot)

    solve_fm.defjvp(jvp, symbolic_zeros=True)
    return solve_fm(p, saveat, arrays)
