"""Arrays held by the problem itself (not in p): differentiated, vmapped, or neither, with
every sensitivity. They once leaked out of the adjoints' custom_vjp as tracers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import DDE_METHODS, ODE_METHODS, ids, pendulum

TOL = dict(rtol=1e-10, atol=1e-12)


def _dde(x0):
    rhs = lambda t, x, lag, p: p["a"] * x + p["b"] * lag[0]
    return sv.DDEProblem(rhs, lambda t, p: jnp.full((2,), p["c"]), lambda p: jnp.stack([p["tau"]]), 0.0, 3.0, x0=x0)


P_DDE = {"a": jnp.asarray(-0.4), "b": jnp.asarray(0.7), "c": jnp.asarray(0.3), "tau": jnp.asarray(1.0)}


@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_gradient_wrt_an_x0_array_in_an_ode_problem_is_exact(sensitivity):
    rhs = lambda t, x, p: -p * x
    loss = lambda x0, p: jnp.sum(sv.solve(sv.ODEProblem(rhs, x0, 0.0, 2.0), p, sensitivity=sensitivity, **TOL).ys[-1] ** 2)
    x0 = jnp.array([1.0, -2.0])
    g_x0, g_p = jax.grad(loss, argnums=(0, 1))(x0, 0.5)
    # x(T) = x0 e^{-pT}: dL/dx0 = 2 x0 e^{-2pT}, dL/dp = -2T |x0|² e^{-2pT}
    np.testing.assert_allclose(g_x0, 2 * x0 * np.exp(-2.0), rtol=1e-7)
    np.testing.assert_allclose(g_p, -4.0 * 5.0 * np.exp(-2.0), rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", DDE_METHODS, ids=ids)
def test_gradient_wrt_an_x0_array_in_a_dde_problem_matches_finite_differences(sensitivity):
    loss = lambda x0, p: jnp.sum(sv.solve(_dde(x0), p, saveat=jnp.array([1.5, 3.0]), sensitivity=sensitivity,
                                          **TOL).ys ** 2)
    x0 = jnp.array([1.0, -0.5])
    g_x0, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(x0, P_DDE)
    eps, value = 1e-6, jax.jit(loss)  # compiled once for every evaluation
    fd = [(value(x0.at[i].add(eps), P_DDE) - value(x0.at[i].add(-eps), P_DDE)) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(g_x0, np.array(fd), rtol=1e-5)
    for k in P_DDE:
        fd = (value(x0, {**P_DDE, k: P_DDE[k] + eps}) - value(x0, {**P_DDE, k: P_DDE[k] - eps})) / (2 * eps)
        np.testing.assert_allclose(g_p[k], fd, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_vmap_over_initial_states_held_by_the_problem(sensitivity):
    field = pendulum().rhs
    x0s = jnp.array([[0.5, 0.0], [1.0, 0.2], [-0.8, 0.1]])
    p = {"m": jnp.asarray(1.3), "k": jnp.asarray(0.7)}
    one = lambda x0, p: jnp.sum(sv.solve(sv.ODEProblem(field, x0, 0.0, 3.0), p, sensitivity=sensitivity,
                                         **TOL).ys[-1] ** 2)
    batched = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(one, in_axes=(0, None))(x0s, p))))(p)
    grad_one = jax.jit(jax.grad(one, argnums=1))  # compiled once for the three trajectories
    each = [grad_one(x0, p) for x0 in x0s]
    for k in p:
        np.testing.assert_allclose(batched[k], sum(g[k] for g in each), rtol=1e-8)


@pytest.mark.parametrize("sensitivity", [sv.ForwardMode(), sv.InterpolatingAdjoint()], ids=ids)
def test_differentiating_the_end_time_asks_for_backprop(sensitivity):
    rhs = lambda t, x, p: -p * x
    loss = lambda t1: sv.solve(sv.ODEProblem(rhs, jnp.ones(2), 0.0, t1), 0.5, sensitivity=sensitivity).ys[-1].sum()
    with pytest.raises(ValueError, match="t1 is not supported.*Backprop"):
        jax.grad(loss)(jnp.asarray(2.0))
