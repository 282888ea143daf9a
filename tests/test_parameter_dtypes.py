"""jax.grad of a float32 parameter is float32, whatever the solve's dtype. ForwardMode and the
continuous adjoints computed it in the state's float64 (ravel_pytree promotes too) and returned
it so: an optimizer's state then turned float64, and a jitted training loop over float32
parameters failed on its carry's changed type. Backprop (JAX's own reverse pass) never did."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import solvers as sv
from helpers import DDE_METHODS, ODE_METHODS, assert_close, ids, linear_dde

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_float32_parameters_of_a_float64_ode_keep_their_dtype_through_a_training_loop(sensitivity):
    prob = sv.ODEProblem(lambda t, x, p: p["a"] * x, jnp.array([1.0, 0.5]), 0.0, 1.0)
    saveat = jnp.array([0.5, 1.0], jnp.float32)
    loss = lambda p: jnp.sum(sv.solve(prob, p, saveat=saveat, sensitivity=sensitivity, **TOL).ys[-1])
    p = {"a": jnp.asarray(-0.5, jnp.float32)}
    opt = optax.adam(1e-2)

    def train_step(_, carry):
        p, state = carry
        updates, state = opt.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    p2, state2 = jax.jit(lambda p: jax.lax.fori_loop(0, 2, train_step, (p, opt.init(p))))(p)
    assert p2["a"].dtype == jnp.float32 and state2[0].mu["a"].dtype == jnp.float32
    grad = jax.jit(jax.grad(loss))(p)
    assert grad["a"].dtype == jnp.float32
    # x(1) = x0 e^a: dL/da = 1.5 e^a
    np.testing.assert_allclose(float(grad["a"]), 1.5 * np.exp(-0.5), rtol=1e-6)
    ct_saveat = jax.grad(lambda ts: jnp.sum(sv.solve(prob, p, saveat=ts, sensitivity=sensitivity, **TOL).ys))(saveat)
    assert ct_saveat.dtype == jnp.float32  # d x(t_k)/dt_k = a x(t_k)
    np.testing.assert_allclose(ct_saveat, -0.5 * 1.5 * np.exp(-0.5 * np.asarray(saveat, np.float64)), rtol=1e-6)


@pytest.mark.parametrize("sensitivity", DDE_METHODS, ids=ids)
def test_float32_parameters_of_a_float64_dde_get_float32_exact_gradients(refcases, sensitivity):
    case = refcases["A_jump"]
    p = {k: jnp.asarray(v, jnp.float32) for k, v in case["params"].items()}
    prob = linear_dde(case["T"])
    prob = sv.DDEProblem(prob.rhs, prob.history, prob.delays, prob.t0, prob.t1,
                         x0=lambda p: p["x0"].astype(jnp.float64))  # a float64 state
    x_T = lambda p: sv.solve(prob, p, sensitivity=sensitivity, **TOL).ys[-1]
    grad = jax.jit(jax.grad(x_T))(p)
    assert {k: v.dtype for k, v in grad.items()} == {k: jnp.float32 for k in p}
    assert_close(grad, case["grad_xT"], rel=1e-6, name=repr(sensitivity))  # c = 0.7 rounded to float32: ~1e-8
