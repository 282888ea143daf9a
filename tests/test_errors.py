"""Every solver error is triggered and says what to do."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv


def _ode(f, t1=2.0):
    return sv.ODEProblem(f, jnp.array([1.0]), 0.0, t1)


def _dde(delay):
    return sv.DDEProblem(lambda t, x, lag, p: -lag[0], lambda t, p: jnp.ones_like(t), lambda p: jnp.atleast_1d(p),
                         0.0, 5.0)


def test_step_budget_exhausted_says_raise_max_steps():
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"step budget exhausted: max_steps=3 .*Raise max_steps"):
        sv.solve(_ode(lambda t, x, p: -x), None, max_steps=3)


def test_an_rtol_below_the_dtypes_resolution_is_named():
    """float32 at rtol 1e-12 exhausts any step budget: the error says rtol is the cause."""
    prob = sv.ODEProblem(lambda t, x, p: -x, jnp.ones(2, jnp.float32), 0.0, 1.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"max_steps=4096 .*rtol=1e-12 is below 10 eps of float32 "
                                                      r"\(eps = 1.19e-07\).*or solve in float64"):
        sv.solve(prob, None, rtol=1e-12, atol=1e-14)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"loosen rtol/atol.\n"):  # float64 at 1e-12: no hint
        sv.solve(_ode(lambda t, x, p: -x), None, rtol=1e-12, max_steps=3)


def test_a_budget_below_what_the_smallest_delay_allows_is_named():
    """A DDE's step is at most its smallest delay: τ = 1e-3 on [0, 10] needs 10000 steps. Eagerly
    the solve says so before compiling; under jit (τ traced) the budget error says why."""
    prob = _dde(None)
    with pytest.raises(ValueError, match=r"smallest delay \(tau = 0.001\), so \[0, 5\] takes at least 5000 "
                                         r"steps, above max_steps=4096"):
        sv.solve(prob, jnp.array([1e-3]))
    assert int(sv.solve(prob, jnp.array([0.1]), max_steps=60).stats["steps"]) >= 50  # 50 allowed: no refusal
    with pytest.raises(ValueError, match="takes at least 50 steps, above max_steps=49"):
        sv.solve(prob, jnp.array([0.1]), max_steps=49)
    with pytest.raises(Exception, match=r"max_steps=4096 .* A DDE's step is never longer than its "
                                                      r"smallest delay: \[t0, t1\] takes at least \(t1 - t0\)"):
        jax.jit(lambda tau: sv.solve(prob, tau).ys)(jnp.array([1e-3]))
    # the check reads t0 and t1 only where they are concrete: not under an eager jax.grad in t1
    x_T = lambda t1: sv.solve(sv.DDEProblem(prob.rhs, prob.history, prob.delays, 0.0, t1), jnp.array([0.5]),
                              sensitivity=sv.Backprop(), rtol=1e-10, atol=1e-12).ys[-1]
    assert abs(float(jax.grad(x_T)(2.0)) - 1 / 48) < 1e-9  # dx(T)/dT = x'(2) = -x(1.5) = 1/48


def test_more_save_times_than_max_steps_is_named():
    """Landing on each save time takes a step per save time after t0: 4999 of them ran out of
    the 4096-step budget after compiling, with the advice to loosen rtol, which cannot help."""
    prob = _ode(lambda t, x, p: -x, t1=1.0)
    with pytest.raises(ValueError, match=r"lands a step on each of saveat's 4999 times after t0, above "
                                         r"max_steps=4096: .*land_on_saveat=False"):
        sv.solve(prob, None, saveat=jnp.linspace(0.0, 1.0, 5000))
    assert int(sv.solve(prob, None, saveat=jnp.linspace(0.0, 1.0, 4097)).stats["steps"]) == 4096  # the bound is tight
    assert sv.solve(prob, None, saveat=jnp.linspace(0.0, 1.0, 5000), land_on_saveat=False).ys.shape == (5000, 1)


def test_step_size_underflow_says_stiff():
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"step size underflow.*stiff"):
        sv.solve(_ode(lambda t, x, p: x**2), None)  # blows up at t = 1


@pytest.mark.parametrize("fixed", [False, True])
def test_nan_in_state(fixed):
    kw = {"solver": sv.RK4(), "dt0": 0.1} if fixed else {}
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"NaN or inf in the state"):
        sv.solve(_ode(lambda t, x, p: jnp.where(t > 0.5, jnp.nan, -x)), None, **kw)


def test_non_positive_delay_concrete_and_traced():
    with pytest.raises(ValueError, match=r"delays must be finite and > 0, got \[-1.0\]"):
        sv.solve(_dde(-1.0), jnp.array([-1.0]))
    with pytest.raises(Exception, match=r"non-positive or non-finite delay"):
        eqx.filter_jit(lambda p: sv.solve(_dde(None), p).ys)(jnp.array([0.0]))
    with pytest.raises(Exception, match=r"non-positive or non-finite delay"):
        eqx.filter_jit(lambda p: sv.solve(_dde(None), p).ys)(jnp.array([jnp.nan]))


def test_history_buffer_full_says_raise_history_size():
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"history buffer full: history_size=3 .*Raise history_size"):
        sv.solve(_dde(1.0), jnp.array([1.0]), rtol=1e-10, history_size=3)


def test_small_history_is_enough_when_steps_are_evicted():
    """The ring buffer only keeps the last max delay: a long solve fits in a small buffer."""
    prob = sv.DDEProblem(lambda t, x, lag, p: -lag[0] + jnp.sin(3 * t), lambda t, p: jnp.ones_like(t),
                         lambda p: jnp.array([1.0]), 0.0, 40.0)
    big = sv.solve(prob, None, rtol=1e-8, history_size=1024)
    small = sv.solve(prob, None, rtol=1e-8, history_size=64)
    assert int(big.stats["steps"]) > 64
    assert float(jnp.abs(big.ys - small.ys).max()) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"rhs\(t, x, p\) returned shape \(3,\) but the state x has shape \(1,\)"):
        sv.solve(_ode(lambda t, x, p: jnp.zeros(3)), None)
    bad = sv.DDEProblem(lambda t, x, lag, p: lag, lambda t, p: jnp.ones(2), lambda p: jnp.array([1.0, 2.0]), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"returned shape \(2, 2\) but the state x has shape \(2,\)"):
        sv.solve(bad, None)
    bad_hist = sv.DDEProblem(lambda t, x, lag, p: x, lambda t, p: jnp.ones(3), lambda p: jnp.array([1.0]), 0.0, 1.0,
                             x0=jnp.ones(2))
    with pytest.raises(ValueError, match=r"history\(t, p\) returned shape \(3,\)"):
        sv.solve(bad_hist, None)


def test_complex_and_promoting_dtypes_are_refused_not_cast():
    """A complex initial state lost its imaginary part (cast to float64) and a complex or wider
    rhs output failed deep in the loop; both now name the dtypes at trace time. A narrower rhs
    output (float32 into a float64 solve) is promoted as before."""
    with pytest.raises(TypeError, match="initial state is complex128: ndde integrates real states"):
        sv.solve(sv.ODEProblem(lambda t, x, p: -x, jnp.array([1.0 + 1.0j]), 0.0, 1.0), None)
    for half in (jnp.float16, jnp.bfloat16):  # float16 said "NaN or inf in the state" (the error norm overflowed)
        with pytest.raises(TypeError, match=f"initial state is {jnp.dtype(half)}: ndde's error control needs float32"):
            sv.solve(sv.ODEProblem(lambda t, x, p: -x, jnp.ones(1, half), 0.0, 1.0), None)
    with pytest.raises(TypeError, match=r"rhs\(t, x, p\) returned dtype complex128: ndde integrates real states"):
        sv.solve(_ode(lambda t, x, p: -x * (1 + 0j)), None)
    f32 = sv.ODEProblem(lambda t, x, p: -x.astype(jnp.float64), jnp.array([1.0], jnp.float32), 0.0, 1.0)
    with pytest.raises(TypeError, match="returned dtype float64 but the state x is float32"):
        sv.solve(f32, None)
    bad_hist = sv.DDEProblem(lambda t, x, lag, p: -lag[0], lambda t, p: jnp.ones(1, jnp.float64),
                             lambda p: jnp.array([1.0]), 0.0, 1.0, x0=jnp.ones(1, jnp.float32))
    with pytest.raises(TypeError, match=r"history\(t, p\) returned dtype float64 but the state x is float32"):
        sv.solve(bad_hist, None)
    for tree in (lambda x: (x,), lambda x: {"x": x}):  # was "'tuple' object has no attribute 'shape'"
        with pytest.raises(TypeError, match=r"rhs\(t, x, p\) must return one array of the state's shape \(1,\), got"):
            sv.solve(_ode(lambda t, x, p: tree(-x)), None)
    ys = sv.solve(_ode(lambda t, x, p: (-x).astype(jnp.float32)), None, rtol=1e-5).ys
    assert ys.dtype == jnp.float64 and abs(float(ys[-1, 0]) - float(jnp.exp(-2.0))) < 1e-4


def test_bad_arguments():
    prob = _ode(lambda t, x, p: -x)
    with pytest.raises(ValueError, match="rtol must be a positive finite number, got -1"):
        sv.solve(prob, None, rtol=-1)
    for bad in ("1e-6", True, jnp.ones(2), float("nan")):
        with pytest.raises(ValueError, match="atol must be a positive finite number, got"):
            sv.solve(prob, None, atol=bad)
    with pytest.raises(TypeError, match="rtol must be a concrete number, got a traced value"):
        jax.jit(lambda r: sv.solve(prob, None, rtol=r).ys)(1e-6)
    # a concrete 0-d array or NumPy scalar is a number (was "must be a positive finite number, got Array(1e-06)")
    same = [sv.solve(prob, None, rtol=r).ys for r in (1e-6, jnp.asarray(1e-6), np.float64(1e-6))]
    assert all(bool(jnp.all(ys == same[0])) for ys in same)
    with pytest.raises(ValueError, match="max_steps must be a positive int, got 0"):
        sv.solve(prob, None, max_steps=0)
    for name in ("max_steps", "history_size"):  # True was the int 1: a budget of one step
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got True"):
            sv.solve(prob, None, **{name: True})
    assert sv.solve(prob, None, max_steps=np.int64(100)).stats["steps"] > 1
    # the loop counts steps in int32: a larger budget is refused, not wrapped
    with pytest.raises(ValueError, match=r"max_steps must be at most 2\*\*31 - 1 = 2147483647 .*got 4611686018427387904"):
        sv.solve(prob, None, max_steps=2**62)
    with pytest.raises(TypeError, match="land_on_saveat must be True or False, got 'no'"):  # was landed (truthy)
        sv.solve(prob, None, land_on_saveat="no")
    with pytest.raises(TypeError, match="controller must be PIController.* or ConstantStepSize.*, got 'pi'"):
        sv.solve(prob, None, controller="pi")  # was AttributeError: 'str' object has no attribute 'init_state'
    with pytest.raises(TypeError, match="ODEProblem: rhs must be a function, got float 3.0"):
        sv.ODEProblem(3.0, jnp.ones(1), 0.0, 1.0)
    with pytest.raises(TypeError, match=r"DDEProblem: delays must be a function, got Array"):
        sv.DDEProblem(lambda t, x, lag, p: -lag[0], lambda t, p: jnp.ones(1), jnp.array([1.0]), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"need finite t0 < t1, got t0=0.0, t1=0.0"):
        sv.solve(_ode(lambda t, x, p: -x, t1=0.0), None)
    with pytest.raises(ValueError, match=r"need finite t0 < t1, got t0=0.0, t1=inf"):  # was "step size underflow"
        sv.solve(_ode(lambda t, x, p: -x, t1=jnp.inf), None)
    with pytest.raises(Exception, match=r"ndde: need finite t0 < t1"):  # traced: was a message about saveat
        jax.jit(lambda t1: sv.solve(_ode(lambda t, x, p: -x, t1=t1), None).ys)(-1.0)
    # concrete save times: the message names the value (the check inside the solve cannot)
    with pytest.raises(ValueError, match=r"saveat\[1\] = 0.5 does not come after saveat\[0\] = 1.0: saveat must be strictly increasing"):
        sv.solve(prob, None, saveat=jnp.array([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"ndde: saveat\[2\] = 2.5 lies outside \[t0, t1\] = \[0.0, 2.0\]"):
        sv.solve(prob, None, saveat=[0.5, 1.0, 2.5])
    with pytest.raises(ValueError, match=r"ndde: saveat\[1\] = nan is not a finite time"):
        sv.solve(prob, None, saveat=[0.5, float("nan")])
    with pytest.raises(Exception, match="saveat must be strictly increasing and lie in"):
        jax.jit(lambda s: sv.solve(prob, None, saveat=s).ys)(jnp.array([1.0, 0.5]))
    H = lambda x, p: jnp.sum(x**2)  # JAX's messages named neither J nor H
    for J in (jnp.eye(3), jnp.ones(2)):  # was "dot_general requires contracting dimensions ..."
        with pytest.raises(ValueError, match=rf"GradientField: J must be a \(d, d\) matrix with d = x.shape\[-1\] = 2, got shape \({J.shape[0]},"):
            sv.solve(sv.ODEProblem(sv.GradientField(H, J), jnp.ones(2), 0.0, 1.0), None)
    with pytest.raises(ValueError, match=r"GradientField: H\(x, p\) must return a scalar .* got shape \(2,\)"):
        sv.solve(sv.ODEProblem(sv.GradientField(lambda x, p: x**2, jnp.eye(2)), jnp.ones(2), 0.0, 1.0), None)
    J = sv.canonical_hamiltonian_j(2)
    with pytest.raises(ValueError, match=r"GradientField: extra\(t, x, p\) must return the state's shape \(2,\), got \(1,\)"):
        sv.solve(sv.ODEProblem(sv.GradientField(H, J, extra=lambda t, x, p: -x[:1]), jnp.ones(2), 0.0, 1.0), None)
    with pytest.raises(TypeError, match="GradientField: H must be a function H\\(x, p\\) .* got H=3.0"):
        sv.GradientField(3.0, J)
    with pytest.raises(TypeError, match="DDEProblem: a GradientField is an ODE right-hand side"):
        sv.DDEProblem(sv.GradientField(H, J), lambda t, p: jnp.ones(2), lambda p: jnp.array([1.0]), 0.0, 1.0)
    for d in (0, 3, 2.0):  # 0 gave an empty J
        with pytest.raises(ValueError, match=f"canonical J needs an even state size d >= 2, got d={d}"):
            sv.canonical_hamiltonian_j(d)
    with pytest.raises(TypeError, match="x0 must be one array .* got dict: flatten a pytree state"):
        sv.solve(sv.ODEProblem(lambda t, x, p: x, {"q": jnp.ones(2)}, 0.0, 1.0), None)
    with pytest.raises(ValueError, match="delays\\(p\\) must return a 1-D array"):
        sv.solve(sv.DDEProblem(lambda t, x, l, p: x, lambda t, p: jnp.ones(()), lambda p: jnp.ones((2, 2)), 0.0, 1.0), None)
    with pytest.raises(TypeError, match="solver must be an ExplicitRK"):
        sv.solve(prob, None, solver="tsit5")


def test_errors_fire_inside_jit_and_vmap():
    f = eqx.filter_jit(jax.vmap(lambda s: sv.solve(_ode(lambda t, x, p: -p * x), s, max_steps=5).ys))
    with pytest.raises(Exception, match="step budget exhausted"):
        f(jnp.array([1.0, 1e4]))


def _failing_solves(throw):
    """The solves above that fail (budget, underflow, history buffer, saveat, a traced zero delay)."""
    return {
        "step budget": lambda: sv.solve(_ode(lambda t, x, p: -x), None, max_steps=3, throw=throw).ys,
        "underflow": lambda: sv.solve(_ode(lambda t, x, p: x**2), None, throw=throw).ys,
        "history buffer": lambda: sv.solve(_dde(1.0), jnp.array([1.0]), rtol=1e-10, history_size=3, throw=throw).ys,
        "saveat": lambda: sv.solve(_ode(lambda t, x, p: -x), None, saveat=jnp.array([1.0, 0.5]), throw=throw).ys,
        # NaN compares false: a NaN save time passed the check and read 0 (silently)
        "NaN saveat": lambda: sv.solve(_ode(lambda t, x, p: -x), None, saveat=jnp.array([0.5, jnp.nan]), throw=throw).ys,
        "zero delay": lambda: jax.jit(lambda p: sv.solve(_dde(None), p, throw=throw).ys)(jnp.array([0.0])),
    }


def test_throw_false_gives_nan_instead_of_raising():
    for name, run in _failing_solves(throw=False).items():
        assert bool(jnp.all(jnp.isnan(run()))), name
    for name, run in _failing_solves(throw=True).items():
        with pytest.raises(Exception, match="ndde: "):
            run()
    ok = sv.solve(_ode(lambda t, x, p: -x), None, throw=False).ys
    assert float(jnp.abs(ok - sv.solve(_ode(lambda t, x, p: -x), None).ys).max()) == 0.0
    with pytest.raises(TypeError, match="throw must be True or False, got 0"):
        sv.solve(_ode(lambda t, x, p: -x), None, throw=0)


@pytest.mark.parametrize("sensitivity", [sv.Backprop(), sv.ForwardMode(), sv.InterpolatingAdjoint(),
                                         sv.QuadratureAdjoint()], ids=lambda s: type(s).__name__)
def test_throw_false_gradients_compile_without_host_callbacks(sensitivity):
    """What lets JAX's persistent compilation cache keep a program (the training pipeline's step):
    no host callback anywhere in the gradient of a DDE solve. The default raises through one."""
    grad = lambda throw: jax.jit(jax.grad(lambda d: jnp.sum(sv.solve(_dde(None), d, sensitivity=sensitivity,
                                                                     throw=throw).ys)))
    hlo = lambda throw: grad(throw).lower(jnp.array([1.0])).as_text()
    assert "callback" not in hlo(False)
    assert "callback" in hlo(True)


@pytest.mark.parametrize("sensitivity", [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(),
                                         sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()],
                         ids=lambda s: type(s).__name__)
def test_a_failed_forward_solve_stops_a_jitted_gradient(sensitivity):
    """jax.jit(jax.grad(...)) of a loss linear in ys never reads ys itself, so a check on ys alone
    is compiled away; the forward solve's status must reach the reverse pass (a failed solve
    gave a gradient, no error, before it did)."""
    prob = _ode(lambda t, x, p: -p * x)
    grad = jax.jit(jax.grad(lambda p: sv.solve(prob, p, max_steps=4, sensitivity=sensitivity).ys[-1, 0]))
    with pytest.raises(Exception, match="step budget exhausted: max_steps=4"):
        grad(jnp.asarray(1.0))
    quiet = jax.jit(jax.grad(lambda p: sv.solve(prob, p, max_steps=4, sensitivity=sensitivity, throw=False).ys[-1, 0]))
    assert bool(jnp.isnan(quiet(jnp.asarray(1.0))))


_SWEEPS = [(s, kind) for kind in ("ode", "dde") for s in (sv.InterpolatingAdjoint(), sv.QuadratureAdjoint())
           ] + [(sv.BacksolveAdjoint(), "ode")]


@pytest.mark.parametrize("vmapped", [False, True], ids=["single", "vmap"])
@pytest.mark.parametrize("sensitivity, kind", _SWEEPS, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_a_backward_sweep_out_of_steps_stops_the_gradient(sensitivity, vmapped, kind):
    """40 observations: the forward takes fewer than 30 steps, the backward sweep stops at each
    observation and runs out of max_steps=30. The gradient of QuadratureAdjoint (and of every
    adjoint under vmap) is the accumulated ∫ f_pᵀλ; with x0 independent of p nothing else read
    the sweep's state, so its check was compiled away and the gradient came back wrong without
    an error (-11.5 for -26.8 on the ODE, -5.9 for -32.3 on the DDE). With throw=False it is NaN."""
    if kind == "ode":
        prob = sv.ODEProblem(lambda t, x, p: -p * x, jnp.ones(2), 0.0, 1.0)
    else:
        prob = sv.DDEProblem(lambda t, x, lag, p: -p * lag[0], lambda t, p: jnp.ones(2), lambda p: jnp.array([0.3]),
                             0.0, 1.0, x0=jnp.ones(2))
    obs = jnp.linspace(0.025, 1.0, 40)

    def grad(throw):
        L = lambda w: jnp.sum(sv.solve(prob, w, saveat=obs, rtol=1e-10, atol=1e-12, max_steps=30,
                                       land_on_saveat=False, sensitivity=sensitivity, throw=throw).ys ** 2)
        g = jax.grad(L)
        return jax.jit(jax.vmap(g))(jnp.array([0.9, 0.8])) if vmapped else jax.jit(g)(0.9)

    assert int(sv.solve(prob, 0.9, saveat=obs, rtol=1e-10, atol=1e-12, land_on_saveat=False).stats["steps"]) < 30
    with pytest.raises(Exception, match="step budget exhausted: max_steps=30"):
        jax.block_until_ready(grad(True))
    assert bool(jnp.all(jnp.isnan(grad(False))))


_NAN_DERIVATIVES = {  # value finite, derivative NaN: d/du sqrt(u) at 0 is inf, times 0
    "f_x": lambda t, x, p: -p * x + 0.0 * jnp.sqrt(x - x),
    "f_p only": lambda t, x, p: -(1.0 + jnp.sqrt(p)) * x,  # at p = 0
}


@pytest.mark.parametrize("where", list(_NAN_DERIVATIVES))
@pytest.mark.parametrize("sensitivity", [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(),
                                         sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()], ids=repr)
def test_a_non_finite_derivative_of_the_rhs_is_an_error_not_a_nan_gradient(sensitivity, where):
    """Backprop and ForwardMode returned a NaN gradient without a word, QuadratureAdjoint too when
    only f_p was NaN; the other adjoints ran their sweep to max_steps (a NaN starting step) and
    said 'step budget exhausted'. Every method now raises an error that names the derivative;
    throw=False still returns the NaN gradient."""
    prob = sv.ODEProblem(_NAN_DERIVATIVES[where], jnp.ones(2), 0.0, 1.0)
    grad = lambda throw: jax.jit(jax.grad(lambda w: jnp.sum(sv.solve(prob, w, saveat=jnp.array([0.5, 1.0]),
                                                                     sensitivity=sensitivity, throw=throw).ys)))
    w = 0.9 if where == "f_x" else 0.0
    assert bool(jnp.all(jnp.isfinite(sv.solve(prob, w).ys)))
    with pytest.raises(Exception, match=r"ndde: (the gradient came out NaN or inf|NaN or inf in the state)"):
        jax.block_until_ready(grad(True)(w))
    assert bool(jnp.isnan(grad(False)(w)))


@pytest.mark.parametrize("sensitivity", [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(),
                                         sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()], ids=repr)
def test_a_non_finite_derivative_of_the_loss_is_named_as_the_loss(sensitivity):
    """A loss whose derivative is NaN at the solution (jnp.sqrt of 0). The adjoints said "NaN or
    inf in the state ... there the rhs's derivative was non-finite", blaming the rhs, and Backprop
    said only that the gradient came out NaN; each now names the loss's derivative. ForwardMode's
    rule is a custom JVP (so that jax.linearize can evaluate it) and never sees the loss's
    cotangent: it returns the NaN gradient, as JAX does for the loss itself."""
    prob = sv.ODEProblem(lambda t, x, p: -p * x, jnp.ones(2), 0.0, 1.0)
    grad = lambda throw: jax.jit(jax.grad(lambda w: jnp.sum(jnp.sqrt(0.0 * sv.solve(
        prob, w, saveat=jnp.array([0.5, 1.0]), sensitivity=sensitivity, throw=throw).ys))))
    if isinstance(sensitivity, sv.ForwardMode):
        assert bool(jnp.isnan(grad(True)(0.9)))
    else:
        with pytest.raises(Exception, match=r"ndde: the loss's derivative with respect to the solution ys"):
            jax.block_until_ready(grad(True)(0.9))
    assert bool(jnp.isnan(grad(False)(0.9)))


@pytest.mark.parametrize("sensitivity", [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(),
                                         sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()], ids=repr)
def test_throw_false_gradient_of_a_vmapped_sum_is_the_sum_of_the_gradients(sensitivity):
    """jax.grad of the sum of a vmapped loss, with respect to a parameter the trajectories share
    and to their own initial values, with throw=False: the training step's form. Backprop's
    came out 4x (the batch size) the sum of the per-trajectory gradients for the shared
    parameter, its NaN check having broadcast that cotangent over the batch (16x in a training
    job's shard of 16). A DDE for every method that takes one, an ODE for BacksolveAdjoint."""
    if isinstance(sensitivity, sv.BacksolveAdjoint):
        prob = sv.ODEProblem(lambda t, x, p: -p["k"] * x, lambda p: p["x0"] * jnp.ones(2), 0.0, 1.0)
    else:
        prob = sv.DDEProblem(lambda t, x, lag, p: -p["k"] * lag[0], lambda t, p: p["x0"] * jnp.ones(2),
                             lambda p: jnp.array([0.3]), 0.0, 1.0)
    L = lambda k, x0: jnp.sum(sv.solve(prob, {"k": k, "x0": x0}, saveat=jnp.array([0.5, 1.0]), rtol=1e-8,
                                       atol=1e-10, sensitivity=sensitivity, throw=False).ys ** 2)
    x0s = jnp.array([1.0, 2.0, 3.0, 4.0])
    of_sum = jax.jit(jax.grad(lambda k, xs: jnp.sum(jax.vmap(L, (None, 0))(k, xs)), argnums=(0, 1)))(0.7, x0s)
    each = jax.jit(jax.vmap(jax.grad(L, argnums=(0, 1)), (None, 0)))(0.7, x0s)
    np.testing.assert_allclose(of_sum[0], jnp.sum(each[0]), rtol=1e-10)
    np.testing.assert_allclose(of_sum[1], each[1], rtol=1e-10)


@pytest.mark.parametrize("sensitivity", [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(),
                                         sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()], ids=repr)
def test_throw_false_under_vmap_makes_only_the_failing_trajectories_nan(sensitivity):
    """Four trajectories: w = 0.5 has a NaN derivative (sqrt at 0), w = 200 needs 94 steps and
    gets 20; both come out NaN, the other two keep their exact gradient (to 1e-6 at rtol 1e-6).
    equinox's own on_error="nan" reduces the failure over the batch, and every trajectory came
    out NaN."""
    rhs = lambda t, x, p: -p * x + 0.0 * jnp.sqrt(jnp.abs(p - 0.5) * x)
    prob = sv.ODEProblem(rhs, jnp.ones(2), 0.0, 1.0)
    L = lambda w: jnp.sum(sv.solve(prob, w, saveat=jnp.array([0.5, 1.0]), sensitivity=sensitivity, max_steps=20,
                                   throw=False).ys)
    ws = jnp.array([0.9, 0.5, 0.7, 200.0])
    batched = jax.jit(jax.vmap(jax.grad(L)))(ws)
    assert bool(jnp.isnan(batched[1])) and bool(jnp.isnan(batched[3]))
    for i in (0, 2):  # L = 2 Σ_t exp(-w t)
        exact = -2 * sum(t * np.exp(-float(ws[i]) * t) for t in (0.5, 1.0))
        np.testing.assert_allclose(batched[i], exact, rtol=1e-6)
    values = jax.jit(jax.vmap(L))(ws)
    assert bool(jnp.isnan(values[3])) and bool(jnp.all(jnp.isfinite(values[:3])))
