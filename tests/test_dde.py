import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import linear_dde, refcase_params


def _max_obs_error(case, **kw):
    sol = sv.solve(linear_dde(case["T"]), refcase_params(case), saveat=jnp.array(case["obs_times"]),
                   rtol=1e-10, atol=1e-12, **kw)
    exact = np.array([case["x_obs"][f"{t}"] for t in case["obs_times"]])
    return float(np.max(np.abs(np.asarray(sol.ys) - exact))), sol


@pytest.mark.parametrize("name", ["A_jump", "A_cont"])
@pytest.mark.parametrize("solver", [sv.Tsit5(), sv.Dopri5()], ids=lambda s: s.name)
def test_linear_dde_matches_exact(refcases, name, solver):
    err, sol = _max_obs_error(refcases[name], solver=solver)
    assert err <= 1e-8, err
    assert abs(float(sol.ys[-1]) - refcases[name]["xT"]) <= 1e-8


def test_breakpoint_tracking_is_what_makes_it_accurate(refcases):
    case = refcases["A_jump"]
    tracked, _ = _max_obs_error(case)
    untracked, _ = _max_obs_error(case, _track_breakpoints=False)
    assert untracked >= 100 * tracked, (tracked, untracked)


def test_jump_in_x0_lands_on_t0_plus_tau():
    """With x0 != history(t0), a save time just after tau must see the kinked solution
    exactly; landing on tau makes the step there restart with the right-sided slope."""
    p = {"a": -0.5, "b": -1.0, "tau": 1.0, "c": 0.7, "x0": 1.0}
    ts = jnp.array([1.0, 1.0 + 1e-6])
    sol = sv.solve(linear_dde(), p, saveat=ts, rtol=1e-10, atol=1e-12)
    slope = float((sol.ys[1] - sol.ys[0]) / 1e-6)
    # x'(1+) = a x(1) + b x(0+) = a x(1) + b x0 ; x'(1-) uses the history c instead
    right = -0.5 * float(sol.ys[0]) - 1.0 * 1.0
    assert abs(slope - right) < 1e-5


def _eigen_problem(tau):
    lam = -1.0
    for _ in range(50):  # Newton on lam + exp(-lam tau) = 0
        lam -= (lam + np.exp(-lam * tau)) / (1 - tau * np.exp(-lam * tau))
    prob = sv.DDEProblem(lambda t, x, lag, p: -lag[0], lambda t, p: jnp.exp(lam * t), lambda p: jnp.array([tau]),
                         0.0, 5.0)
    return prob, lam


def test_delay_much_smaller_than_natural_step():
    tau = 0.01
    prob, lam = _eigen_problem(tau)
    ts = jnp.linspace(0.0, 5.0, 11)
    sol = sv.solve(prob, None, saveat=ts, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sol.ys, np.exp(lam * np.asarray(ts)), rtol=0, atol=1e-9)
    # the cap at the smallest delay is what bounds the step (documented in _forward)
    assert int(sol.stats["steps"]) >= 5.0 / tau
    ode_steps = int(sv.solve(sv.ODEProblem(lambda t, x, p: lam * x, jnp.array(1.0), 0.0, 5.0), None,
                             rtol=1e-9, atol=1e-12).stats["steps"])
    assert ode_steps < 5.0 / tau  # the natural step of the same solution is much larger


def test_small_delay_nonlinear_against_tiny_fixed_step():
    tau = 0.01
    rhs = lambda t, x, lag, p: -lag[0] * (1.0 + 0.5 * jnp.sin(x))
    prob = sv.DDEProblem(rhs, lambda t, p: jnp.cos(t), lambda p: jnp.array([tau]), 0.0, 5.0)
    ts = jnp.linspace(0.0, 5.0, 6)
    adaptive = sv.solve(prob, None, saveat=ts, rtol=1e-10, atol=1e-12)
    reference = sv.solve(prob, None, saveat=ts, solver=sv.RK4(), dt0=tau / 20, max_steps=20000)
    np.testing.assert_allclose(adaptive.ys, reference.ys, rtol=0, atol=1e-9)


def test_two_delays_against_aligned_fixed_step():
    rhs = lambda t, x, lag, p: -lag[0] - 0.5 * lag[1] + 0.1 * x
    prob = sv.DDEProblem(rhs, lambda t, p: jnp.ones_like(t), lambda p: jnp.array([1.0, 0.4]), 0.0, 4.0,
                         x0=2.0)
    ts = jnp.array([0.5, 1.3, 2.2, 4.0])
    adaptive = sv.solve(prob, None, saveat=ts, rtol=1e-10, atol=1e-12)
    # RK4 with dt dividing both delays lands on every breakpoint by construction
    reference = sv.solve(prob, None, saveat=ts, solver=sv.RK4(), dt0=0.0025, max_steps=20000, history_size=1024)
    np.testing.assert_allclose(adaptive.ys, reference.ys, rtol=0, atol=1e-9)


def test_vector_state_and_float32():
    rhs = lambda t, x, lag, p: jnp.stack([x[1], -lag[0, 0]])
    prob = sv.DDEProblem(rhs, lambda t, p: jnp.stack([jnp.cos(t), -jnp.sin(t)]).astype(jnp.float32),
                         lambda p: jnp.array([0.5], jnp.float32), 0.0, 3.0)
    f32 = sv.solve(prob, None, rtol=1e-5, atol=1e-6)
    assert f32.ys.dtype == jnp.float32 and f32.ys.shape == (1, 2)
    hist64 = lambda t, p: jnp.stack([jnp.cos(t), -jnp.sin(t)]).astype(jnp.float64)
    ref = sv.solve(sv.DDEProblem(rhs, hist64, lambda p: jnp.array([0.5]), 0.0, 3.0), None, rtol=1e-10,
                   atol=1e-12)
    np.testing.assert_allclose(np.asarray(f32.ys, np.float64), ref.ys, atol=2e-4)


def test_history_parameters_enter_the_solution(refcases):
    p = refcase_params(refcases["A_jump"])
    base = sv.solve(linear_dde(), p).ys
    moved = sv.solve(linear_dde(), {**p, "c": p["c"] + 0.1}).ys
    assert float(jnp.abs(moved - base)[0]) > 1e-3


def _jump_problem(t0):
    """x' = -0.3 x - 0.8 x(t - 0.1) on [t0, t0 + 3], history 1, x(t0) = 0.5 (a jump at t0)."""
    return sv.DDEProblem(lambda t, x, lag, p: -0.3 * x - 0.8 * lag[0], lambda t, p: jnp.ones_like(t),
                         lambda p: jnp.array([0.1]), t0, t0 + 3.0, x0=0.5)


def test_a_jump_at_a_nonzero_t0_is_read_on_the_right_side():
    """The same autonomous problem started at t0 = 0.3 and at 0: the same steps and values. At
    t0 = 0.3 the lookups at t0 + kτ - τ ((0.3 + 0.1) - 0.1 = 0.30000000000000004) fell one ulp
    past t0, on x0's side of the jump: the step's last stages read the wrong value, and the error
    control took 139 steps (32 rejected) for 67."""
    rel = jnp.array([0.45, 1.3, 2.2, 3.0])
    at0 = sv.solve(_jump_problem(0.0), None, saveat=rel, rtol=1e-11, atol=1e-12)
    shifted = sv.solve(_jump_problem(0.3), None, saveat=rel + 0.3, rtol=1e-11, atol=1e-12)
    assert int(shifted.stats["steps"]) == int(at0.stats["steps"])
    assert int(shifted.stats["rejected"]) == int(at0.stats["rejected"])
    np.testing.assert_allclose(shifted.ys, at0.ys, rtol=0, atol=1e-14)


def test_commensurate_delays_are_moved_apart_by_some_hundred_ulps():
    """separating_shift: zero for one delay and for delays whose breakpoints stay apart; for
    τ = (0.2, 0.1) (0.2 is 2 × 0.1 in floats), two equal and three commensurate delays a shift
    below 1e-10 of the delays (3e-5 in float32) after which every two breakpoints in (t0, t1) lie
    at least the separation apart."""
    from solvers._breakpoints import SEPARATION_F64, breakpoint_times, separating_shift
    from solvers._history import side_tolerance

    t0, t1 = jnp.asarray(0.0), jnp.asarray(2.0)
    tol = side_tolerance(t0, t1)
    sep = float(tol) * SEPARATION_F64

    def gaps(taus):
        b = np.sort(np.asarray(breakpoint_times(t0, taus, 6)))
        b = b[(b > 0) & (b < 2)]
        return np.diff(b)

    assert not np.any(np.asarray(separating_shift(jnp.array([0.3]), t0, t1, 6, tol)))
    assert not np.any(np.asarray(separating_shift(jnp.array([0.7, 0.45]), t0, t1, 6, tol)))
    for taus in (jnp.array([0.2, 0.1]), jnp.array([0.5, 0.5]), jnp.array([0.3, 0.2, 0.1])):
        assert np.min(gaps(taus)) < sep
        shift = separating_shift(taus, t0, t1, 6, tol)
        assert 0 < float(jnp.max(jnp.abs(shift) / taus)) < 1e-10
        assert np.min(gaps(taus + shift)) >= sep
    # float32: 1.3e-5 of the delays for (0.2, 0.1) (7e-5 when the separation was 12 side tolerances
    # and the search took the smallest absolute shift)
    from solvers._breakpoints import SEPARATION

    t0, t1, taus = jnp.float32(0.0), jnp.float32(2.0), jnp.array([0.2, 0.1], jnp.float32)
    tol = side_tolerance(t0, t1)
    shift = separating_shift(taus, t0, t1, 6, tol)
    assert 0 < float(jnp.max(jnp.abs(shift) / taus)) < 3e-5
    b = np.sort(np.asarray(breakpoint_times(t0, taus + shift, 6)))
    assert np.min(np.diff(b[(b > 0) & (b < 2)])) >= float(tol) * SEPARATION


def test_constant_commensurate_delays_keep_one_landing_per_time():
    """Delays that are constants where solve is called have no derivative: coinciding breakpoints
    keep one landing (8 evenly spaced delays on [0, 3]: 49 steps). Moved apart, as traced delays
    are, each of the 3002 breakpoints would take a landing of its own (819 steps: the history
    buffer of 256 overflows, as it does for 8 generic delays, 885 steps). Traced delays behind
    jax.lax.stop_gradient have no derivative either and keep one landing."""
    rhs = lambda t, x, lag, p: -0.5 * jnp.mean(lag, axis=0) + 0.1 * x
    prob = sv.DDEProblem(rhs, lambda t, p: jnp.ones_like(t), lambda p: p, 0.0, 3.0, x0=0.5)
    sol = sv.solve(prob, jnp.asarray(np.linspace(0.3, 1.0, 8)), rtol=1e-8, atol=1e-10)
    assert int(sol.stats["steps"]) < 100, sol.stats
    # under jit (as the training pipeline runs), delays that do not depend on what is traced: JAX
    # stages even a constant array there, so solve reads the dependence from the delays' jaxpr
    fixed = sv.DDEProblem(lambda t, x, lag, p: p * jnp.mean(lag, axis=0) + 0.1 * x, lambda t, p: jnp.ones_like(t),
                          lambda p: jnp.asarray(np.linspace(0.3, 1.0, 8)), 0.0, 3.0, x0=0.5)
    steps = jax.jit(lambda a: sv.solve(fixed, a, rtol=1e-8, atol=1e-10).stats["steps"])(-0.5)
    assert int(steps) == int(sol.stats["steps"]), int(steps)
    # traced delays that are not learned: behind jax.lax.stop_gradient they keep one landing too
    held = sv.DDEProblem(rhs, lambda t, p: jnp.ones_like(t), lambda p: jax.lax.stop_gradient(p), 0.0, 3.0, x0=0.5)
    steps = jax.jit(lambda p: sv.solve(held, p, rtol=1e-8, atol=1e-10).stats["steps"])(jnp.asarray(np.linspace(0.3, 1.0, 8)))
    assert int(steps) == int(sol.stats["steps"]), int(steps)
