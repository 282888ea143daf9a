"""ForwardMode: forward sensitivities through the solver, contracted in the backward pass.

The forward loop is a ``lax.while_loop``, which JAX differentiates in forward mode; the
custom_vjp's forward pass computes the Jacobian dys/dp (one jvp per entry of p, batched)
and its backward pass contracts it with the cotangent. Cost grows with the size of p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def forward_mode_solve(prob, p, saveat, opts):
    from .._solve import check_status, forward_solve, stats_of

    def outputs(p, saveat):
        final, _ = forward_solve(prob, p, saveat, opts)
        return check_status(final.ys, final.status, opts), stats_of(final)

    @jax.custom_vjp
    def solve_fm(p, saveat):
        return outputs(p, saveat)

    def fwd(p, saveat):
        # one batched jvp pass yields the Jacobian and (as aux) the primal outputs
        jac, out = jax.jacfwd(lambda q: (lambda o: (o[0], o))(outputs(q, saveat)), has_aux=True)(p)
        return out, (jac, saveat)

    def bwd(res, ct):
        jac, saveat = res
        ct_ys = ct[0]
        grad = jax.tree_util.tree_map(lambda J: jnp.tensordot(ct_ys, J, axes=ct_ys.ndim), jac)
        return grad, jnp.zeros_like(saveat)

    solve_fm.defvjp(fwd, bwd)
    return solve_fm(p, saveat)
