"""jit and vmap give the same results as a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np

import solvers as sv
from helpers import linear_dde, pendulum

OBS = jnp.array([0.5, 1.2, 1.7, 2.5, 3.5])


def _dde_ys(p):
    return sv.solve(linear_dde(), p, saveat=OBS, rtol=1e-8, atol=1e-10).ys


def test_vmap_and_jit_over_delay_history_and_x0_match_a_loop():
    batch = {"a": jnp.full(4, -0.5), "b": jnp.full(4, -1.0), "tau": jnp.array([0.6, 0.9, 1.0, 1.3]),
             "c": jnp.array([0.7, 1.0, 0.2, -0.3]), "x0": jnp.array([1.0, 1.0, 0.5, 2.0])}
    batched = jax.jit(jax.vmap(_dde_ys))(batch)
    loop = jnp.stack([_dde_ys(jax.tree_util.tree_map(lambda v: v[i], batch)) for i in range(4)])
    np.testing.assert_allclose(batched, loop, rtol=0, atol=1e-12)


def test_vmap_ode_over_parameters_matches_loop():
    q0s = jnp.array([0.3, 1.0, 2.0])
    solve = lambda q0: sv.solve(pendulum(), {"m": 1.0, "k": 2.0, "q0": q0}, rtol=1e-8).ys[-1]
    batched = jax.vmap(jax.jit(solve))(q0s)
    loop = jnp.stack([solve(q) for q in q0s])
    np.testing.assert_allclose(batched, loop, rtol=0, atol=1e-12)


def test_stats_are_per_trajectory_under_vmap():
    stats = jax.vmap(lambda tau: sv.solve(linear_dde(), {"a": -0.5, "b": -1.0, "tau": tau, "c": 0.7,
                                                          "x0": 1.0}, rtol=1e-8).stats)(jnp.array([0.5, 1.5]))
    assert stats["steps"].shape == (2,)
    assert int(stats["steps"][0]) != int(stats["steps"][1])
