"""Backprop's stored loop (solvers._reverse_loop): the ODE's reverse pass when the step count is
known after the forward. Checked against equinox's checkpointed loop (Backprop(checkpoints=N)),
central differences and an exact solution, with more attempts than slots (the stride doubles,
segments are re-run), rejected attempts, vmap over trajectories of different lengths and a
Hessian-vector product through it."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import assert_hvp_matches_differences
from solvers._reverse_loop import sizes


@pytest.mark.parametrize("max_steps,slots", [(1, None), (2, None), (60, None), (4096, None), (4097, None),
                                             (100, 3), (100, 7), (37, 2)])
def test_every_checkpoint_keeps_its_slot_and_each_segment_fits(max_steps, slots):
    """Replays the forward's slot policy for max_steps attempts: the checkpoint written always
    has a slot, no write overwrites a live checkpoint (checkpoint k, the state before attempt
    k·stride, stays in slot_of[k] after every doubling), and the stride (a segment's length,
    re-run into the segment buffer) never exceeds the segment buffer. Without slots: the
    smallest power of 2 whose square covers max_steps."""
    n_slots, segment = sizes(max_steps, slots)
    if slots is None:
        assert n_slots * n_slots >= max_steps and (n_slots == 2 or (n_slots // 2) ** 2 < max_steps)
    stride, slot_of, held = 1, list(range(n_slots)), {}
    for i in range(max_steps):
        if i // stride >= n_slots:
            slot_of, stride = slot_of[0::2] + slot_of[1::2], 2 * stride
        assert i // stride < n_slots and stride <= segment, (i, stride)
        if i % stride == 0:
            held[slot_of[i // stride]] = i
        assert all(held[slot_of[k]] == k * stride for k in range(i // stride + 1)), i
    assert sorted(slot_of) == list(range(n_slots))


def _van_der_pol(mu=3.0):
    rhs = lambda t, x, p: jnp.stack([x[1], p["mu"] * (1 - x[0] ** 2) * x[1] - x[0]])
    return sv.ODEProblem(rhs, lambda p: p["x0"], 0.0, 6.0)


P = {"mu": jnp.asarray(3.0), "x0": jnp.array([2.0, 0.0])}
TS = jnp.linspace(0.5, 6.0, 7)


def _loss(p, sensitivity, max_steps=100, x0=None):
    q = dict(p) if x0 is None else {**p, "x0": x0}
    sol = sv.solve(_van_der_pol(), q, saveat=TS, rtol=1e-6, atol=1e-6, max_steps=max_steps, sensitivity=sensitivity,
                   dt0=0.5)
    return jnp.sum(sol.ys ** 2), sol.stats


def test_more_attempts_than_slots_match_the_checkpointed_loop_and_differences():
    """max_steps 100: 16 slots, segments of up to 8 attempts. The solve takes 75 attempts, 9
    rejected, so the stride doubles thrice and every segment is re-run; the gradient is
    equinox's loop's to 1e-12 and central differences' to 1e-5 (differences also see the
    controller's step sizes move with p, which Backprop holds fixed: 2.2e-6 apart here)."""
    stats = jax.jit(lambda p: _loss(p, sv.Backprop())[1])(P)
    attempts = int(stats["steps"] + stats["rejected"])
    assert 4 * sizes(100)[0] < attempts <= 100 and int(stats["rejected"]) >= 2, stats
    grad = lambda s: jax.jit(jax.grad(lambda p: _loss(p, s)[0]))(P)
    stored, checkpointed = grad(sv.Backprop()), grad(sv.Backprop(checkpoints=100))
    flat = lambda g: jax.flatten_util.ravel_pytree(g)[0]
    g, ref = flat(stored), flat(checkpointed)
    assert float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref))) < 1e-12
    x, unravel = jax.flatten_util.ravel_pytree(P)
    f = jax.jit(lambda x: _loss(unravel(x), sv.Backprop())[0])
    eps = 1e-6
    fd = np.array([(f(x.at[i].add(eps)) - f(x.at[i].add(-eps))) / (2 * eps) for i in range(x.size)])
    assert float(np.max(np.abs(np.asarray(g) - fd)) / np.max(np.abs(fd))) < 1e-5


def test_vmap_over_trajectories_of_different_lengths():
    """Under vmap the loops run until the longest trajectory ends; each trajectory's gradient is
    its own solve's (a batched while loop that kept stepping a finished trajectory, or skipped a
    rejected attempt's VJP for the whole batch, would change it)."""
    x0s = jnp.array([[2.0, 0.0], [0.1, 0.0], [1.0, 1.0]])
    one = jax.jit(jax.grad(lambda p, x0: _loss(p, sv.Backprop(), x0=x0)[0]))
    many = jax.jit(jax.vmap(jax.grad(lambda p, x0: _loss(p, sv.Backprop(), x0=x0)[0]), (None, 0)))
    attempts = [int(s["steps"] + s["rejected"]) for s in
                (jax.jit(lambda x0: _loss(P, sv.Backprop(), x0=x0)[1])(x0) for x0 in x0s)]
    assert len(set(attempts)) == 3, attempts
    batched = many(P, x0s)
    for i, x0 in enumerate(x0s):
        single = one(P, x0)
        for k in single:
            np.testing.assert_allclose(batched[k][i], single[k], rtol=1e-12, atol=1e-14)


def test_exact_gradient_and_hessian_vector_product():
    """x' = -k x: x(t) = x0 e^(-kt), L = Σ x(t_i)² over the save times; dL/dk and dL/dx0 exact to
    1e-7 at rtol 1e-10 with more attempts (74) than slots (max_steps 100: 16), and the
    Hessian-vector product (jax.jvp of jax.grad, which differentiates the reverse pass in
    forward mode) against central differences of the gradient."""
    prob = sv.ODEProblem(lambda t, x, p: -p["k"] * x, lambda p: p["x0"], 0.0, 4.0)
    ts = jnp.linspace(0.5, 4.0, 8)
    L = lambda p: jnp.sum(sv.solve(prob, p, saveat=ts, rtol=1e-10, atol=1e-12, max_steps=100,
                                   sensitivity=sv.Backprop()).ys ** 2)
    p = {"k": jnp.asarray(0.7), "x0": jnp.asarray(1.3)}
    steps = jax.jit(lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-10, atol=1e-12, max_steps=100).stats["steps"])(p)
    assert int(steps) > sizes(100)[0], steps
    g = jax.jit(jax.grad(L))(p)
    e = np.exp(-2 * 0.7 * np.asarray(ts))
    exact = {"k": float(np.sum(-2 * np.asarray(ts) * 1.3 ** 2 * e)), "x0": float(np.sum(2 * 1.3 * e))}
    for k, v in exact.items():
        assert abs(float(g[k]) - v) <= 1e-7 * abs(v), (k, float(g[k]), v)
    assert_hvp_matches_differences(L, p, eps=1e-5)


def test_learned_end_time():
    """t1 traced (an array in the problem, as the pipeline's models pass it, or a learned one):
    the loop's stop test closes over it, and its derivative must not reach the loop's
    non-differentiable arguments (it failed with "Unexpected tangent"). x' = -k x observed at
    t1: dL/dt1 = x'(t1) = -k x0 e^(-k t1), and the gradient w.r.t. k and x0 alongside."""
    def L(t1, p):
        prob = sv.ODEProblem(lambda t, x, p: -p["k"] * x, lambda p: p["x0"], 0.0, t1)
        return sv.solve(prob, p, saveat=jnp.stack([t1]), rtol=1e-10, atol=1e-12, sensitivity=sv.Backprop()).ys[-1]

    p = {"k": jnp.asarray(0.7), "x0": jnp.asarray(1.3)}
    g_t1, g_p = jax.jit(jax.grad(L, argnums=(0, 1)))(jnp.asarray(2.0), p)
    x = 1.3 * np.exp(-1.4)
    assert abs(float(g_t1) + 0.7 * x) <= 1e-7 * 0.7 * x
    assert abs(float(g_p["k"]) + 2.0 * x) <= 1e-7 * 2.0 * x and abs(float(g_p["x0"]) - x / 1.3) <= 1e-7 * x / 1.3
