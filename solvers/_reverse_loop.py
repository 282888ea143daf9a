"""Backprop's loop when the reverse pass may know the forward's step count: two-level
checkpointing with √max_steps stored states.

Equinox's checkpointed while loop (online checkpointing, Stumm and Walther 2010) decides
during the forward pass which states to keep, not knowing how many steps follow; its reverse
pass is one loop that chooses, step by step, between advancing from a checkpoint and a VJP,
and it learns which carries a derivative reaches by re-tracing the step. Here the forward
pass keeps every ``stride``-th loop state in ``slots`` slots; when they are full, the stride
doubles and every other slot is freed for the states to come (only the map from checkpoint
to slot is permuted: no state moves), and it lists the attempts that were accepted. The
reverse pass then knows the step count: one loop over the accepted attempts, last first, that
on entering a segment re-runs its ``stride - 1`` steps from its stored state (keeping each)
and takes each accepted attempt's VJP (a rejected one's is the identity). With n ≤ slots
(the usual case: every state stored) nothing is re-run; otherwise each step is re-run once.
Under vmap a loop's carry is selected per trajectory after every iteration, so the forward
writes its slots and list as equinox buffers and the reverse pass is a single loop. Memory:
``slots + segment`` states (128 for max_steps 4096, where equinox keeps ⌊√(2 max_steps)⌋ =
90), ``segment`` the largest stride max_steps can reach, and one int per attempt.

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
    unchanged (a rejected attempt), so its VJP is the identity: the reverse pass visits only
    the other attempts (a lax.cond that skipped them cost 8% under vmap, where it is rarely
    the whole batch's to skip)."""
    body = eqx.filter_closure_convert(body, init)
    # cond's constants (t1, ...) may carry a derivative (a learned t1); a boolean has none
    cond = jax.tree.map(lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x,
                        eqx.filter_closure_convert(cond, init))
    n_slots, segment = sizes(max_steps, slots)
    final, _ = _loop((init, body), cond, n_slots, segment, max_steps, split, merge, identity)
    floats, others = eqx.partition(final, eqx.is_inexact_array)
    return eqx.combine(floats, lax.stop_gradient(others))  # integer carries: no JVP tracers downstream


def _forward(init, body, cond, n_slots, max_steps, split, identity):
    """(final state, store, slot_of, taken, n_taken, n, stride): checkpoint k (the state before
    attempt k·stride) is in slot slot_of[k] of store; taken[:n_taken] are the attempts whose
    VJP is not the identity, in order."""
    small0, _ = split(init)
    store = jax.tree.map(lambda x: jnp.zeros((n_slots,) + jnp.shape(x), jnp.result_type(x)), small0)

    def step(carry):
        st, store, taken, slot_of, i, n_taken, stride = carry
        full = i // stride >= n_slots
        # doubling the stride keeps the even checkpoints; the odd ones' slots take the next ones
        slot_of = jnp.where(full, jnp.concatenate([slot_of[0::2], slot_of[1::2]]), slot_of)
        stride = jnp.where(full, 2 * stride, stride)
        slot = slot_of[jnp.minimum(i // stride, n_slots - 1)]
        small, _ = split(st)
        store = jax.tree.map(lambda x, s: s.at[slot].set(x, pred=i % stride == 0), small, store)  # s: a buffer
        new = body(st)
        kept = ~identity(new)
        taken = taken.at[jnp.minimum(n_taken, max_steps - 1)].set(i, pred=kept)
        return new, store, taken, slot_of, i + 1, n_taken + kept.astype(jnp.int32), stride

    zero, one = jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32)
    carry = (init, store, jnp.zeros((max_steps,), jnp.int32), jnp.arange(n_slots, dtype=jnp.int32), zero, zero, one)
    # buffers: under vmap their writes are predicated per trajectory, not a select over all of them
    final, store, taken, slot_of, n, n_taken, stride = eqxi.while_loop(
        lambda c: cond(c[0]), step, carry, kind="lax", buffers=lambda c: jax.tree.leaves(c[1]) + [c[2]])
    return final, store, slot_of, taken, n_taken, n, stride


@eqx.filter_custom_vjp
def _loop(vjp_arg, cond, n_slots, segment, max_steps, split, merge, identity):
    init, body = vjp_arg  # not differentiated: nothing to store
    final, n = lax.while_loop(lambda c: cond(c[0]), lambda c: (body(c[0]), c[1] + 1), (init, jnp.zeros((), jnp.int32)))
    return final, n


def _loop_fwd(perturbed, vjp_arg, cond, n_slots, segment, max_steps, split, merge, identity):
    init, body = vjp_arg
    final, *rest = _forward(init, body, cond, n_slots, max_steps, split, identity)
    return (final, rest[-2]), (final, *rest)


def _loop_bwd(residuals, grad_obj, perturbed, vjp_arg, cond, n_slots, segment, max_steps, split, merge, identity):
    final, store, slot_of, taken, n_taken, n, stride = residuals
    _, body = vjp_arg
    _, big = split(final)
    ct_final, _ = grad_obj
    ct_state = _zeros_where_none(ct_final, final)
    float_body, static_body = eqx.partition(body, eqx.is_inexact_array)
    ct_body = jax.tree.map(jnp.zeros_like, float_body)
    state_of = lambda small: merge(small, big)

    def rerun(k, entering, seg):
        """Segment k's states (re-run from its checkpoint) into seg; rows are written only for
        the trajectories entering it (no select over seg)."""
        first = jax.tree.map(lambda s: s[slot_of[k]], store)
        put = lambda seg, row, x: jax.tree.map(lambda b, v: b.at[row].set(jnp.where(entering, v, b[row])), seg, x)

        def again(j, c):
            small, seg = c
            small, _ = split(body(state_of(small)))
            return small, put(seg, j, small)

        length = jnp.where(entering, jnp.minimum(stride, n - k * stride), 1)
        return lax.fori_loop(1, length, again, (first, put(seg, 0, first)))[1]

    def vjp_step(small, ct_state, ct_body):
        floats, others = eqx.partition(state_of(small), eqx.is_inexact_array)

        def f(fl, fb):
            out = eqx.combine(fb, static_body)(eqx.combine(fl, others))
            return eqx.filter(out, eqx.is_inexact_array)

        _, vjp = jax.vjp(f, floats, float_body)
        d_state, d_body = vjp(eqx.filter(ct_state, eqx.is_inexact_array))
        return (eqx.combine(d_state, eqx.filter(ct_state, eqx.is_inexact_array, inverse=True)),
                jax.tree.map(jnp.add, ct_body, d_body))

    def back(carry):
        m, held, seg, ct_state, ct_body = carry
        m = m - 1
        a = taken[m]
        k = a // stride
        entering = k != held
        seg = lax.cond(eqxi.unvmap_any(entering), lambda: rerun(k, entering, seg), lambda: seg)
        ct_state, ct_body = vjp_step(jax.tree.map(lambda b: b[a - k * stride], seg), ct_state, ct_body)
        return m, k, seg, ct_state, ct_body

    seg0 = jax.tree.map(lambda s: jnp.zeros((segment,) + s.shape[1:], s.dtype), store)
    carry = (n_taken, -jnp.ones((), jnp.int32), seg0, ct_state, ct_body)
    _, _, _, ct_init, ct_body = lax.while_loop(lambda c: c[0] > 0, back, carry)
    return eqx.filter(ct_init, eqx.is_inexact_array), ct_body


_loop.def_fwd(_loop_fwd)
_loop.def_bwd(_loop_bwd)


def _zeros_where_none(ct, like):
    return jax.tree.map(lambda x, c: jnp.zeros_like(x) if c is None else c, like, ct)
