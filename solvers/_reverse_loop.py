"""Backprop's loop when the reverse pass may know the forward's step count: two-level
checkpointing with √max_steps stored states.

Equinox's checkpointed while loop (Griewank's online treeverse) decides during the forward
pass which states to keep, not knowing how many steps follow; its reverse pass is one loop
that chooses, step by step, between advancing from a checkpoint and a VJP. Here the forward
pass keeps every ``stride``-th loop state in ``slots`` slots; when they are full, every other
one is dropped and the stride doubles. The reverse pass then knows the step count n: for each
segment, last first, it re-runs the segment's ``stride - 1`` steps from its stored state
(keeping each) and takes the VJPs of its steps in reverse order. With n ≤ slots (the usual
case: every state stored) nothing is re-run; otherwise each step is re-run once. Memory:
``slots + segment`` states, ``segment`` the largest stride max_steps can reach.

The reverse pass is plain JAX (loops of ``jax.vjp``), so a Hessian-vector product (jax.jvp of
jax.grad) differentiates it in forward mode.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax import lax


def sizes(max_steps: int, slots: int | None = None) -> tuple[int, int]:
    """(slots, segment): with slots=None the smallest power of 2 with slots² ≥ max_steps."""
    if slots is None:
        slots = 2
        while slots * slots < max_steps:
            slots *= 2
    segment = 1
    while slots * segment < max_steps:  # the stride doubles when attempt slots·stride < max_steps starts
        segment *= 2
    return slots, segment


def stored_while_loop(cond: Callable, body: Callable, init, *, max_steps: int, split: Callable, merge: Callable,
                      identity: Callable, slots: int | None = None):
    """``lax.while_loop(cond, body, init)``, reverse-mode differentiable. ``split(state)`` ->
    (small, big): what is stored per slot and the write-only buffers (the body only writes
    them, so its derivative does not depend on their values); ``merge`` inverts it.
    ``identity(new_state)``: the step that produced it passed its floating carries through
    unchanged (a rejected attempt), so its VJP is the identity and is skipped."""
    body = eqx.filter_closure_convert(body, init)
    cond = eqx.filter_closure_convert(cond, init)
    n_slots, segment = sizes(max_steps, slots)
    final, _ = _loop((init, body), cond, n_slots, segment, max_steps, split, merge, identity)
    floats, others = eqx.partition(final, eqx.is_inexact_array)
    return eqx.combine(floats, lax.stop_gradient(others))  # integer carries: no JVP tracers downstream


def _forward(init, body, cond, n_slots, max_steps, split, identity):
    small0, _ = split(init)
    store = jax.tree.map(lambda x: jnp.zeros((n_slots,) + jnp.shape(x), jnp.result_type(x)), small0)

    def compact(store):  # slot k keeps slot 2k: the states at multiples of the doubled stride
        keep = (n_slots + 1) // 2
        return jax.tree.map(lambda s: s.at[:keep].set(s[::2][:keep]), store)

    def step(carry):
        st, store, skips, i, stride = carry
        full = i // stride >= n_slots
        store = lax.cond(_unvmap_any(full), lambda: _where(full, compact(store), store), lambda: store)
        stride = jnp.where(full, 2 * stride, stride)
        slot = jnp.minimum(i // stride, n_slots - 1)
        write = i % stride == 0
        small, _ = split(st)
        store = jax.tree.map(lambda s, x: s.at[slot].set(jnp.where(write, x, s[slot])), store, small)
        new = body(st)
        return new, store, skips.at[jnp.minimum(i, max_steps - 1)].set(identity(new)), i + 1, stride

    one = jnp.ones((), jnp.int32)
    skips = jnp.zeros((max_steps,), bool)
    return lax.while_loop(lambda c: cond(c[0]), step, (init, store, skips, 0 * one, one))


@eqx.filter_custom_vjp
def _loop(vjp_arg, cond, n_slots, segment, max_steps, split, merge, identity):
    init, body = vjp_arg  # not differentiated: nothing to store
    final, n = lax.while_loop(lambda c: cond(c[0]), lambda c: (body(c[0]), c[1] + 1), (init, jnp.zeros((), jnp.int32)))
    return final, n


def _loop_fwd(perturbed, vjp_arg, cond, n_slots, segment, max_steps, split, merge, identity):
    init, body = vjp_arg
    final, store, skips, n, stride = _forward(init, body, cond, n_slots, max_steps, split, identity)
    return (final, n), (final, store, skips, n, stride)


def _loop_bwd(residuals, grad_obj, perturbed, vjp_arg, cond, n_slots, segment, max_steps, split, merge, identity):
    final, store, skips, n, stride = residuals
    init, body = vjp_arg
    _, big = split(final)
    ct_final, _ = grad_obj
    ct_state = _zeros_where_none(ct_final, final)
    float_body, static_body = eqx.partition(body, eqx.is_inexact_array)
    ct_body = jax.tree.map(jnp.zeros_like, float_body)

    def state_of(small):
        return merge(small, big)

    def vjp_step(small, skip, ct_state, ct_body):
        floats, others = eqx.partition(state_of(small), eqx.is_inexact_array)

        def f(fl, fb):
            out = eqx.combine(fb, static_body)(eqx.combine(fl, others))
            return eqx.filter(out, eqx.is_inexact_array)

        def pull():
            _, vjp = jax.vjp(f, floats, float_body)
            d_state, d_body = vjp(ct_floats)
            return _where(skip, ct_floats, d_state), _where(skip, ct_body, jax.tree.map(jnp.add, ct_body, d_body))

        ct_floats = eqx.filter(ct_state, eqx.is_inexact_array)
        # under vmap the cond's predicate is the batch's (each trajectory then selects)
        d_state, ct_body = lax.cond(_unvmap_all(skip), lambda: (ct_floats, ct_body), pull)
        return eqx.combine(d_state, eqx.filter(ct_state, eqx.is_inexact_array, inverse=True)), ct_body

    seg0 = jax.tree.map(lambda s: jnp.zeros((segment,) + s.shape[1:], s.dtype), store)

    def one_segment(carry):
        k, ct_state, ct_body = carry
        k = k - 1
        length = jnp.minimum(stride, n - k * stride)
        first = jax.tree.map(lambda s: s[k], store)
        seg = jax.tree.map(lambda b, x: b.at[0].set(x), seg0, first)

        def rerun(j, c):
            small, seg = c
            small, _ = split(body(state_of(small)))
            return small, jax.tree.map(lambda b, x: b.at[j].set(x), seg, small)

        _, seg = lax.fori_loop(1, length, rerun, (first, seg))

        def back(c):
            j, ct_state, ct_body = c
            j = j - 1
            skip = skips[k * stride + j]
            ct_state, ct_body = vjp_step(jax.tree.map(lambda b: b[j], seg), skip, ct_state, ct_body)
            return j, ct_state, ct_body

        _, ct_state, ct_body = lax.while_loop(lambda c: c[0] > 0, back, (length, ct_state, ct_body))
        return k, ct_state, ct_body

    n_segments = (n + stride - 1) // stride
    _, ct_init, ct_body = lax.while_loop(lambda c: c[0] > 0, one_segment, (n_segments, ct_state, ct_body))
    return eqx.filter(ct_init, eqx.is_inexact_array), ct_body


_loop.def_fwd(_loop_fwd)
_loop.def_bwd(_loop_bwd)


def _zeros_where_none(ct, like):
    return jax.tree.map(lambda x, c: jnp.zeros_like(x) if c is None else c, like, ct)


def _where(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _unvmap_any(pred):
    return eqxi.unvmap_any(pred)


def _unvmap_all(pred):
    return eqxi.unvmap_all(pred)
