"""ForwardMode: forward sensitivities through the solver, contracted in the backward pass.

The forward loop is a ``lax.while_loop``, which JAX differentiates in forward mode; the
custom_vjp's forward pass computes the Jacobian dys/dp (one jvp per entry of p, batched)
and its backward pass contracts it with the cotangent. Cost grows with the size of p.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._precision import HIGHEST
from . import _closure


def forward_mode_solve(prob, p, saveat, opts):
    from .._solve import check_gradient, check_status, forward_solve, stats_of

    arrays, static = _closure.split(prob, p)  # the problem's own arrays travel as explicit inputs
    dtypes = _closure.dtypes_of((p, saveat, arrays))

    def outputs(prob, p, saveat):
        final, _ = forward_solve(prob, p, saveat, opts)
        return (check_status(final.ys, final.status, opts), stats_of(final)), final.status

    @jax.custom_vjp
    def solve_fm(p, saveat, arrays):
        return outputs(eqx.combine(arrays, static), p, saveat)[0]

    def fwd(p, saveat, arrays):
        wrt_saveat = _closure.saveat_perturbed(saveat, prob)
        p, saveat = _closure.values(p), _closure.values(saveat)
        diff, const = _closure.by_perturbation(arrays, static)
        # one batched jvp pass over (p, the problem's differentiated arrays) yields the Jacobian
        # and (as aux) the primal outputs
        solve = lambda P: outputs(_closure.rebuild(P[1], const, static), P[0], saveat)
        jac, (out, status) = jax.jacfwd(lambda P: (lambda o: (o[0][0], o))(solve(P)), has_aux=True)((p, diff))
        return out, (jac, status, saveat, const, (out[0], p, diff) if wrt_saveat else (None, None, None))

    def bwd(res, ct):
        jac, status, saveat, const, (ys, p, diff) = res
        ct_ys = _closure.instantiate(ct[0])
        grad = jax.tree_util.tree_map(lambda J: jnp.tensordot(ct_ys, J, axes=ct_ys.ndim, precision=HIGHEST), jac)
        grad_p, grad_diff = check_gradient(grad, status, opts)
        ct_saveat = _closure.saveat_cotangent(_closure.rebuild(diff, const, static), p, saveat, ys, ct_ys)
        return _closure.cotangents(grad_p, ct_saveat, grad_diff, const, dtypes)

    solve_fm.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve_fm(p, saveat, arrays)
