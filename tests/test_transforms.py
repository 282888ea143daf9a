"""jit and vmap give the same results as a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _products_with_batched(jaxpr, shape):
    """dot_general equations with an operand of ``shape``, in ``jaxpr`` and every sub-jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and any(tuple(v.aval.shape) == shape for v in eqn.invars):
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _products_with_batched(sub, shape)
    return found


_METHODS = [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(), sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()]


@pytest.mark.parametrize("kind,sens", [(k, s) for k in ("ode", "dde") for s in _METHODS if k == "ode" or s.supports_dde],
                         ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_vmap_never_copies_the_weights_per_trajectory(kind, sens):
    """Under vmap over trajectories, a lax.cond on a per-trajectory predicate whose branch closes
    over the parameters broadcasts them to the batch (JAX's batched cond selects on its operands):
    each trajectory then multiplied by its own copy of every weight matrix (a third of the vmapped
    HNN adjoints' time). No product in the gradient's program may take a (batch, *W2.shape) operand."""
    B, key = 3, jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    p = {"W1": 0.3 * jax.random.normal(k1, (2, 7)), "W2": 0.3 * jax.random.normal(k2, (7, 11)),
         "w3": 0.3 * jax.random.normal(k3, (11,)), "tau": jnp.asarray(0.7)}
    H = lambda x, p: jnp.tanh(jnp.tanh(x @ p["W1"]) @ p["W2"]) @ p["w3"]
    J = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
    x0s = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, -1.0]])
    if kind == "ode":
        one = lambda p, x0: sv.solve(sv.ODEProblem(lambda t, x, p: J @ jax.grad(H)(x, p), x0, 0.0, 2.0), p,
                                     saveat=jnp.array([1.0, 2.0]), sensitivity=sens).ys
    else:
        f = lambda t, x, lagged, p: J @ jax.grad(H)(x, p) - 0.5 * lagged[0]
        history, delays = (lambda t, p: p["W1"][:, 0]), (lambda p: p["tau"][None])
        one = lambda p, x0: sv.solve(sv.DDEProblem(f, history, delays, 0.0, 2.0, x0=x0), p,
                                     saveat=jnp.array([1.0, 2.0]), sensitivity=sens).ys
    loss = lambda p: jnp.sum(jax.vmap(one, (None, 0))(p, x0s) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(p).jaxpr
    assert not _products_with_batched(jaxpr, (B, 7, 11)), "W2 multiplies each trajectory as its own copy"
    loop = jax.jit(jax.grad(lambda p: sum(jnp.sum(one(p, x) ** 2) for x in x0s)))
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(p)["W2"], loop(p)["W2"], rtol=1e-6)
