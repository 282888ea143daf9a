"""Several delays: equal and commensurate delays (breakpoints of different delays on one time),
jumps at t0, and on which side of a breakpoint a stage reads, every DDE method against
central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import DDE_METHODS, assert_hvp_matches_differences, ids


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", DDE_METHODS, ids=ids)
def test_two_equal_delays(sensitivity):
    """x' = -a x(t-τ1) - b x(t-τ2) with τ1 = τ2 = 0.5 and a jump at t0: each delay's gradient
    against central differences. The two delays' breakpoints coincide; the grid used to land once
    on them, at a time that followed one delay only, and Backprop and ForwardMode split the delay
    gradient wrongly (0.028 and 0.096 for 0.052 and 0.073). The solve now moves the delays apart
    by ~1e-13 (_breakpoints.separating_shift) and lands on each."""
    rhs = lambda t, x, lag, p: -p["a"] * lag[0] - p["b"] * lag[1]
    prob = sv.DDEProblem(rhs, lambda t, p: p["c"] * jnp.ones_like(t), lambda p: p["tau"], 0.0, 3.0,
                         x0=lambda p: p["x0"])
    p = {"a": jnp.asarray(0.5), "b": jnp.asarray(0.7), "c": jnp.asarray(0.3), "x0": jnp.asarray(1.0),
         "tau": jnp.array([0.5, 0.5])}
    obs = jnp.array([1.3, 2.2, 3.0])
    L = lambda tau, s: jnp.sum(sv.solve(prob, {**p, "tau": tau}, saveat=obs, rtol=1e-10, atol=1e-12,
                                        sensitivity=s).ys ** 2)
    g = jax.jit(jax.grad(lambda tau: L(tau, sensitivity)))(p["tau"])
    f = jax.jit(lambda tau: L(tau, sv.Backprop()))
    eps = 1e-6
    fd = np.array([(f(p["tau"].at[i].add(eps)) - f(p["tau"].at[i].add(-eps))) / (2 * eps) for i in range(2)])
    assert float(np.max(np.abs(np.asarray(g) - fd)) / np.max(np.abs(fd))) < 1e-7, (np.asarray(g), fd)


def _two_delays(t0=0.0):
    """x' = -a1 x(t-τ1) - a2 x(t-τ2), history c, x(t0) = x0 (a jump), on [t0, t0 + 2]."""
    rhs = lambda t, x, lag, p: -p["a1"] * lag[0] - p["a2"] * lag[1]
    return sv.DDEProblem(rhs, lambda t, p: p["c"] * jnp.ones_like(t), lambda p: jnp.stack([p["t1"], p["t2"]]),
                         t0, t0 + 2.0, x0=lambda p: p["x0"])


def _jump_at_t0(rhs, delays, t0=0.37, dtype=None):
    """rhs with history c + 0.3 sin t and x(t0) = x0 (a jump) on [t0, t0 + 2.5] (t0, t1 of
    ``dtype`` when given: it sets the solve's dtype)."""
    t0, t1 = (t0, t0 + 2.5) if dtype is None else (jnp.asarray(t0, dtype), jnp.asarray(t0 + 2.5, dtype))
    return sv.DDEProblem(rhs, lambda t, p: p["c"] + 0.3 * jnp.sin(t), delays, t0, t1, x0=lambda p: p["x0"])


def _central_differences(f, p, eps=1e-6):
    """{k: (f(p + eps e_k) - f(p - eps e_k)) / 2 eps} for a dict of scalars, and its largest |entry|."""
    fd = {k: float(f({**p, k: p[k] + eps}) - f({**p, k: p[k] - eps})) / (2 * eps) for k in p}
    return fd, max(abs(v) for v in fd.values())


_COMMENSURATE = {"a1": 0.7, "a2": 0.4, "t1": 0.2, "t2": 0.1, "c": 1.0, "x0": 0.5}  # 0.2 == 2 * 0.1 in floats


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", DDE_METHODS, ids=ids)
def test_commensurate_delays(sensitivity):
    """τ1 = 2τ2: breakpoints of different origin fall on one float (2τ2 = τ1, τ1 + τ2 = 3τ2, ...).
    Every parameter's gradient against central differences. Before the solve moved the delays
    apart, Backprop and ForwardMode returned dL/dτ1 = -0.050 and dL/dτ2 = -0.266 for -0.147 and
    -0.079 (the landing on 0.2 followed 2τ2 only), InterpolatingAdjoint was off by 1.9e-4 (a
    stage read λ on the wrong side of an observation's jump, see test_history)."""
    p = {k: jnp.asarray(v) for k, v in _COMMENSURATE.items()}
    obs = jnp.array([0.45, 0.95, 1.35, 2.0])
    L = lambda p, s: 0.5 * jnp.sum(sv.solve(_two_delays(), p, saveat=obs, rtol=1e-10, atol=1e-12,
                                            sensitivity=s).ys ** 2)
    g = jax.jit(jax.grad(lambda p: L(p, sensitivity)))(p)
    fd, scale = _central_differences(jax.jit(lambda p: L(p, sv.Backprop())), p)
    for k in p:
        assert abs(float(g[k]) - fd[k]) < 1e-7 * scale, (k, float(g[k]), fd[k])


@pytest.mark.slow
def test_commensurate_delays_hessian_vector_product():
    """Through the step grid of test_commensurate_delays, a Hessian-vector product against
    central differences of the gradient (one program for both). Before, every component was off
    by 0.02-0.07 of about 0.1 (dτ1: -0.097 for -0.134)."""
    p = {k: jnp.asarray(v) for k, v in _COMMENSURATE.items()}
    obs = jnp.array([0.45, 0.95, 1.35, 2.0])
    L = lambda p: 0.5 * jnp.sum(sv.solve(_two_delays(), p, saveat=obs, rtol=1e-10, atol=1e-12,
                                         sensitivity=sv.Backprop()).ys ** 2)
    assert_hvp_matches_differences(L, p, eps=1e-4)


@pytest.mark.slow
def test_commensurate_delays_float32():
    """test_commensurate_delays in float32 (the GPU path; the delays move apart by ~1.3e-5 of
    themselves there): Backprop's gradient within 1e-4 of the exact float64 one (9.6e-6 here;
    3.5e-5 while the separation was 12 side tolerances).
    Before the solve moved the delays apart: off by up to 2.4 relative (dL/dτ1 = -0.050 for
    -0.147), InterpolatingAdjoint by 2.4e-3."""
    obs = [0.45, 0.95, 1.35, 2.0]
    L = lambda p, dtype, **kw: 0.5 * jnp.sum(sv.solve(_two_delays(), p, saveat=jnp.array(obs, dtype), **kw).ys ** 2)
    exact = jax.jit(jax.grad(lambda p: L(p, jnp.float64, rtol=1e-10, atol=1e-12, sensitivity=sv.QuadratureAdjoint())))(
        {k: jnp.asarray(v) for k, v in _COMMENSURATE.items()})
    g = jax.jit(jax.grad(lambda p: L(p, jnp.float32, rtol=1e-6, atol=1e-7, sensitivity=sv.Backprop())))(
        {k: jnp.asarray(v, jnp.float32) for k, v in _COMMENSURATE.items()})
    assert g["t1"].dtype == jnp.float32
    for k in _COMMENSURATE:
        assert abs(float(g[k]) - float(exact[k])) <= 1e-4 * abs(float(exact[k])), (k, float(g[k]), float(exact[k]))


@pytest.mark.slow
def test_commensurate_delays_float32_from_a_nonzero_t0():
    """τ = (3 × 0.1, 0.1) from t0 = 0.37 in float32, a nonlinear rhs: Backprop's gradient within
    1e-4 (of its largest entry) of the exact float64 one (6.3e-6 here). Before capped steps
    landed on a breakpoint an ulp beyond them (test_a_step_capped_at_the_delay_lands_on_the_
    breakpoint_an_ulp_beyond), dL/dτ was off by 1.7e-4 (2.5e-3 of the largest entry) with the
    breakpoints 4 or 6 side tolerances apart (_breakpoints.SEPARATION)."""
    rhs = lambda t, x, lag, p: -jnp.dot(p["a"], jnp.tanh(lag)) + p["b"] * x

    def loss(p, dtype, **kw):
        obs = jnp.asarray(0.37 + np.array([0.6, 1.15, 1.9, 2.5]), dtype)
        return 0.5 * jnp.sum(sv.solve(_jump_at_t0(rhs, lambda p: p["tau"], dtype=dtype), p, saveat=obs, **kw).ys ** 2)

    p = {"a": np.array([0.4911145846589811, 0.7884423198807433]), "b": -0.2,
         "tau": np.array([0.30000000000000004, 0.1]), "c": 1.0, "x0": 0.5}
    as_type = lambda dtype: jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), p)
    exact = jax.jit(jax.grad(lambda p: loss(p, jnp.float64, rtol=1e-11, atol=1e-13,
                                            sensitivity=sv.QuadratureAdjoint())))(as_type(jnp.float64))
    g = jax.jit(jax.grad(lambda p: loss(p, jnp.float32, rtol=1e-6, atol=1e-7, sensitivity=sv.Backprop())))(
        as_type(jnp.float32))
    flat = lambda g: np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(g)])
    err = np.max(np.abs(flat(g) - flat(exact))) / np.max(np.abs(flat(exact)))
    assert err < 1e-4, err


@pytest.mark.slow
def test_two_delay_configurations_every_method_against_differences():
    """Nonlinear two-delay DDEs from t0 = 0.37 with a jump there: commensurate, equal and generic
    delays, every method's gradient against central differences (one compiled program per
    method for all configurations). With a jump at a nonzero t0, lookups at (t0 + τ) - τ fell an
    ulp past t0, on x0's side (test_history): with the generic delays (0.425, 0.513) every method
    was off by 1.9e-3. On the code before lookups got their side tolerance and commensurate
    delays were moved apart, 11 of 12 such configurations had a method off by more than 1e-6
    (the worst 0.61); all are within 4e-7 now."""
    rhs = lambda t, x, lag, p: -p["a1"] * lag[0] - p["a2"] * jnp.tanh(lag[1]) + p["a3"] * x
    prob = _jump_at_t0(rhs, lambda p: jnp.stack([p["t1"], p["t2"]]))
    L = lambda p, obs, s: 0.5 * jnp.sum(sv.solve(prob, p, saveat=obs, rtol=1e-10, atol=1e-12, sensitivity=s).ys ** 2)
    grads = [jax.jit(jax.grad(lambda p, obs, s=s: L(p, obs, s))) for s in DDE_METHODS]
    f = jax.jit(lambda p, obs: L(p, obs, sv.Backprop()))
    configs = [((0.2, 0.1), 0.5, (0.97, 1.22, 1.52, 2.87)), ((0.6, 0.6), 1.0, (0.72, 1.52, 1.87, 2.87)),
               ((0.5, 1.0), 1.0, (0.72, 0.97, 1.22, 1.87)), ((0.425, 0.513), 1.0, (0.97, 1.22, 1.87, 2.27))]
    for (t1, t2), x0, obs in configs:
        p = {k: jnp.asarray(v) for k, v in dict(a1=0.7, a2=0.4, a3=-0.2, t1=t1, t2=t2, c=1.0, x0=x0).items()}
        obs = jnp.asarray(obs)
        fd, scale = _central_differences(lambda p: f(p, obs), p)
        for s, grad in zip(DDE_METHODS, grads):
            g = grad(p, obs)
            err = max(abs(float(g[k]) - fd[k]) for k in p) / scale
            assert err < 1e-6, ((t1, t2), repr(s), err)


def test_stages_read_the_side_of_the_image_they_lie_next_to(monkeypatch):
    """Two breakpoints 6 and 12 ulps apart (t0 + τ1 just before t0 + 2τ2, from t0 = 0.37 with a
    jump in x there), with the delays not moved apart: the step between them has its stages a few
    ulps from the images of its ends. A stage near the start reads what follows the start's image,
    one near the end what precedes the end's (_history.reads_left). When every stage after the
    first read left-sided, the stages near the start read x0's jump at t0 on the history's side and
    Backprop's gradient was off by 0.58 relative at both gaps (dL/dτ1 lost the jump term); that rule
    needed breakpoints 2 side_tol / c2 apart (12.4 side tolerances for Tsit5), this one 2."""
    import solvers._setup as setup_module

    monkeypatch.setattr(setup_module, "separating_shift", lambda taus, *a: jnp.zeros_like(taus))
    rhs = lambda t, x, lag, p: -p["a1"] * lag[0] - p["a2"] * lag[1] + p["a3"] * x
    prob = _jump_at_t0(rhs, lambda p: jnp.stack([p["t1"], p["t2"]]))
    obs = jnp.asarray([0.97, 1.22, 1.52, 2.87])
    L = lambda p, s: 0.5 * jnp.sum(sv.solve(prob, p, saveat=obs, rtol=1e-10, atol=1e-12, sensitivity=s).ys ** 2)
    grad = jax.jit(jax.grad(lambda p: L(p, sv.Backprop())))
    f = jax.jit(lambda p: L(p, sv.Backprop()))
    for ulps in (6, 12):
        t1 = 0.2 - ulps * float(np.spacing(0.57))
        gap = (0.37 + 0.1 + 0.1) - (0.37 + t1)
        assert 5 * np.spacing(0.57) <= gap <= 13 * np.spacing(0.57), gap
        p = {k: jnp.asarray(v) for k, v in dict(a1=0.7, a2=0.4, a3=-0.2, t1=t1, t2=0.1, c=1.0, x0=0.5).items()}
        fd, scale = _central_differences(f, p)
        g = grad(p)
        err = max(abs(float(g[k]) - fd[k]) for k in p) / scale
        assert err < 1e-7, (ulps, err)


def test_a_step_capped_at_the_delay_lands_on_the_breakpoint_an_ulp_beyond():
    """At a loose tolerance every step is capped at the delay. From a breakpoint b, the next one
    b + τ (another sum of the delays than t + τ) lay an ulp beyond the capped step's end: the solve
    stopped an ulp short and took a step of an ulp to it, whose stages read the jump on the wrong
    side. Backprop's dL/dτ was off by 3.9e-3 relative (12 steps); now it lands (11 steps) and is
    within 1e-6 of the exact gradient (rtol 1e-11)."""
    rhs = lambda t, x, lag, p: -p["a"] * jnp.tanh(lag[0]) + p["b"] * x
    prob = _jump_at_t0(rhs, lambda p: jnp.stack([p["tau"]]))
    obs = jnp.asarray(0.37 + np.array([0.6, 1.15, 1.9, 2.5]))
    p = {k: jnp.asarray(v) for k, v in dict(a=0.8, b=-0.2, tau=0.3, c=1.0, x0=0.5).items()}
    L = lambda p, s, rtol: 0.5 * jnp.sum(sv.solve(prob, p, saveat=obs, rtol=rtol, atol=rtol * 0.1,
                                                  sensitivity=s).ys ** 2)
    exact = jax.jit(jax.grad(lambda p: L(p, sv.QuadratureAdjoint(), 1e-11)))(p)
    g = jax.jit(jax.grad(lambda p: L(p, sv.Backprop(), 1e-3)))(p)
    for k in p:
        assert abs(float(g[k]) - float(exact[k])) <= 1e-6 * abs(float(exact[k])), (k, float(g[k]), float(exact[k]))
    assert int(sv.solve(prob, p, saveat=obs, rtol=1e-3, atol=1e-4).stats["steps"]) == 11
