import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import pendulum


@pytest.mark.parametrize("solver", [sv.Tsit5(), sv.Dopri5(), sv.Bosh3()], ids=lambda s: s.name)
def test_rotation_matches_closed_form(solver):
    A = jnp.array([[0.0, 1.0], [-4.0, -0.1]])
    prob = sv.ODEProblem(lambda t, x, p: x @ A.T, jnp.array([1.0, 0.0]), 0.0, 5.0)
    ts = jnp.linspace(0.0, 5.0, 11)
    sol = sv.solve(prob, None, saveat=ts, solver=solver, rtol=1e-9, atol=1e-11, max_steps=20000)
    exact = jnp.stack([jax.scipy.linalg.expm(A * t) @ jnp.array([1.0, 0.0]) for t in ts])
    np.testing.assert_allclose(sol.ts, ts)
    assert float(jnp.max(jnp.abs(sol.ys - exact))) < 1e-7


def test_pendulum_refcase(refcases):
    E = refcases["E"]
    p = {"m": 1.0, "k": 2.0, "q0": 1.0}
    sol = sv.solve(pendulum(), p, rtol=1e-10, atol=1e-12)
    qT, pT = sol.ys[-1]
    assert abs(float(qT) - E["qT"]) < 1e-8 and abs(float(pT) - E["pT"]) < 1e-8
    assert abs(float(qT**2 + pT**2) - E["L"]) < 1e-8


def test_an_eager_solve_compiles_once_and_new_values_reuse_it():
    """Outside jit and vmap solve runs as one compiled program, traced on the first call only: a
    new value of p (a float or an array) reuses it, also under an eager jax.grad. Op by op, every
    call re-traced the right-hand side (the seed example's first solve took 9.5 s, not 3.3 s)."""
    traced = []

    def rhs(t, x, p):
        traced.append(t)
        return -p["k"] * x

    prob = sv.ODEProblem(rhs, jnp.array([1.0, 2.0]), 0.0, 1.0)
    first = sv.solve(prob, {"k": 1.0}, rtol=1e-10, atol=1e-12).ys[-1]
    n = len(traced)
    again = [sv.solve(prob, {"k": k}, rtol=1e-10, atol=1e-12).ys[-1] for k in (2.0, jnp.asarray(3.0))]
    assert n > 0 and len(traced) == n
    for k, y in zip((1.0, 2.0, 3.0), [first, *again]):
        np.testing.assert_allclose(y, np.exp(-k) * np.array([1.0, 2.0]), rtol=1e-8)
    # an eager jax.grad compiles too: its second call, at a new value, traces nothing
    dydk = jax.grad(lambda k: sv.solve(prob, {"k": k}, rtol=1e-10, atol=1e-12).ys[-1, 0])
    grads = [dydk(1.0)]
    n = len(traced)
    grads.append(dydk(2.0))
    assert len(traced) == n
    np.testing.assert_allclose(grads, [-np.exp(-1.0), -np.exp(-2.0)], rtol=1e-7)  # d(e^-k)/dk


def test_tolerance_controls_error(refcases):
    E = refcases["E"]
    errs = []
    for rtol in (1e-5, 1e-8):
        sol = sv.solve(pendulum(), {"m": 1.0, "k": 2.0, "q0": 1.0}, rtol=rtol, atol=rtol * 1e-2)
        errs.append(abs(float(sol.ys[-1, 0]) - E["qT"]))
    assert errs[1] < errs[0] / 100


def test_batch_as_one_system_has_any_shape():
    B = 5
    x0 = jnp.linspace(0.1, 1.0, B)[:, None] * jnp.ones((B, 3))
    prob = sv.ODEProblem(lambda t, x, p: -p * x, x0, 0.0, 1.0)
    sol = sv.solve(prob, 2.0, rtol=1e-9, atol=1e-12)
    assert sol.ys.shape == (1, B, 3)
    np.testing.assert_allclose(sol.ys[0], x0 * np.exp(-2.0), rtol=1e-8)


def test_float32_solve():
    prob = sv.ODEProblem(lambda t, x, p: -x, jnp.array([1.0], jnp.float32), 0.0, 1.0)
    sol = sv.solve(prob, None, rtol=1e-5, atol=1e-7)
    assert sol.ys.dtype == jnp.float32
    assert abs(float(sol.ys[-1, 0]) - np.exp(-1.0)) < 1e-5


def test_lands_on_save_times_and_counts_evaluations():
    prob = sv.ODEProblem(lambda t, x, p: -x, jnp.array([1.0]), 0.0, 1.0)
    ts = jnp.array([0.0, 0.3, 0.7, 1.0])
    sol = sv.solve(prob, None, saveat=ts, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.ys[:, 0], np.exp(-np.asarray(ts)), rtol=1e-7)
    steps, rejected = int(sol.stats["steps"]), int(sol.stats["rejected"])
    assert steps >= 3  # at least one step per save interval
    # Tsit5 is FSAL: 6 new evaluations per attempt, plus k1 and the two of the initial step
    assert int(sol.stats["rhs_evals"]) == 6 * (steps + rejected) + 2


def test_fixed_step_needs_dt0():
    prob = sv.ODEProblem(lambda t, x, p: -x, jnp.array([1.0]), 0.0, 1.0)
    with pytest.raises(ValueError, match="RK4 with constant steps needs dt0"):
        sv.solve(prob, None, solver=sv.RK4())


def test_interpolated_saves_match_landed_saves_with_fewer_steps():
    prob = sv.ODEProblem(lambda t, x, p: jnp.stack([x[1], -jnp.sin(x[0])]), jnp.array([1.0, 0.0]), 0.0, 10.0)
    ts = jnp.linspace(0.0, 10.0, 1000)
    landed = sv.solve(prob, None, saveat=ts, rtol=1e-9, atol=1e-11)
    interp = sv.solve(prob, None, saveat=ts, rtol=1e-9, atol=1e-11, land_on_saveat=False)
    assert int(interp.stats["steps"]) < int(landed.stats["steps"]) / 2
    np.testing.assert_allclose(interp.ys, landed.ys, rtol=0, atol=1e-7)
    np.testing.assert_allclose(interp.ys[0], [1.0, 0.0])
