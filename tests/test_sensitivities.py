"""Gradients by every method against exact values, each other and finite differences."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
import solvers.sensitivity._adjoint as adjoint_module
import solvers.sensitivity._interpolating as interpolating_module
from helpers import DDE_METHODS, ODE_METHODS, assert_close, ids, linear_dde, pendulum, refcase_params
from models import OBS, delayed_gradient_flow, init, loss



def _dde_grad_fn(T, obs, sensitivity, rtol=1e-10, history_size=None):
    """p -> gradients of x(T) and L = Σ x(t_k)²/2 from one solve (jacrev of both), jitted: the
    refcases A_jump and A_cont differ only in p and share one compiled program."""
    obs = jnp.array(obs)

    def both(p):
        ys = sv.solve(linear_dde(T), p, saveat=obs, rtol=rtol, atol=rtol * 1e-2, sensitivity=sensitivity,
                      history_size=history_size).ys
        return jnp.stack([ys[-1], 0.5 * jnp.sum(ys**2)])

    return jax.jit(jax.jacrev(both))


def _dde_grads(case, sensitivity, obs=None, rtol=1e-10, history_size=None):
    fn = _dde_grad_fn(case["T"], case["obs_times"] if obs is None else obs, sensitivity, rtol, history_size)
    return fn(refcase_params(case))


def _both_refcases(refcases, sensitivity, history_size=None):
    """(name, case, gradients) for A_jump and A_cont, from one compiled gradient."""
    jump, cont = refcases["A_jump"], refcases["A_cont"]
    assert (jump["T"], jump["obs_times"]) == (cont["T"], cont["obs_times"])  # one program serves both
    fn = _dde_grad_fn(jump["T"], jump["obs_times"], sensitivity, history_size=history_size)
    return [(name, case, fn(refcase_params(case))) for name, case in (("A_jump", jump), ("A_cont", cont))]


def _assert_refcase_gradients(g, case, name):
    """g from _dde_grad_fn: row 0 the gradient of x(T), row 1 that of L."""
    assert_close({k: v[0] for k, v in g.items()}, case["grad_xT"], name=name)
    assert_close({k: v[1] for k, v in g.items()}, case["grad_L"], name=name)


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", DDE_METHODS + [sv.InterpolatingAdjoint(checkpoints=3)], ids=ids)
def test_exact_dde_gradients(refcases, sensitivity):
    for name, case, g in _both_refcases(refcases, sensitivity):
        _assert_refcase_gradients(g, case, name)


@pytest.mark.slow
def test_exact_dde_gradients_with_re_solved_segments(refcases):
    """InterpolatingAdjoint sweeps the segments its forward history buffer still holds straight
    from it; with 85 steps and history_size = 64 the first two of three are re-solved from their
    checkpoints' windows instead."""
    for name, case, g in _both_refcases(refcases, sv.InterpolatingAdjoint(checkpoints=3), history_size=64):
        obs = jnp.array(case["obs_times"])
        steps = sv.solve(linear_dde(case["T"]), refcase_params(case), saveat=obs, rtol=1e-10, atol=1e-12).stats
        assert int(steps["steps"]) > 64, name
        _assert_refcase_gradients(g, case, name)


@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_exact_pendulum_gradient(refcases, sensitivity):
    E = refcases["E"]
    L = lambda p: jnp.sum(sv.solve(pendulum(), p, rtol=1e-10, atol=1e-12, sensitivity=sensitivity).ys[-1] ** 2)
    g = jax.jit(jax.grad(L))({"m": 1.0, "k": 2.0, "q0": 1.0})
    assert_close(g, E["grad_L"])


@pytest.mark.slow
def test_jump_term_is_what_makes_the_delay_gradient_right(refcases, monkeypatch):
    case = refcases["A_jump"]
    without = case["tau_breakpoint_jump_term"]
    with_term = _dde_grads(case, sv.QuadratureAdjoint())["tau"]
    monkeypatch.setattr(adjoint_module, "_jump_terms", lambda *a, **k: jnp.zeros(5))
    no_term = _dde_grads(case, sv.QuadratureAdjoint())["tau"]
    # the version without the discontinuity term reproduces the refcase's "without" values...
    assert abs(float(no_term[0]) - without["dxT_dtau_without_jump_term"]) < 1e-6
    assert abs(float(no_term[1]) - without["dL_dtau_without_jump_term"]) < 1e-6
    # ...which are far from the exact ones that the real method gets
    assert abs(float(no_term[0]) - case["grad_xT"]["tau"]) > 0.05
    assert abs(float(with_term[0]) - case["grad_xT"]["tau"]) < 1e-7


@pytest.mark.parametrize("sensitivity", DDE_METHODS, ids=ids)
def test_observation_at_the_breakpoint_gives_the_right_derivative(refcases, sensitivity):
    """An observation exactly at t = t0 + τ makes L kinked in τ. Every method returns the right
    derivative (τ → τ0+): the observation counts as lying in [t0, t0 + τ], before the breakpoint,
    because a save time is a fixed time read from the step that ends there."""
    case = refcases["A_jump"]
    brief = case["brief_obs_times_with_t_eq_tau"]
    right = brief["dL_dtau_right (tau->tau0+, t=1 in piece [0,tau])"]
    left = brief["dL_dtau_left (tau->tau0-, t=1 in piece [tau,2tau])"]
    g = _dde_grads(case, sensitivity, obs=brief["obs"])
    assert abs(float(g["tau"][1]) - right) < 1e-6
    assert abs(float(g["tau"][1]) - left) > 1e-2
    assert_close({k: g[k][1] for k in brief["dL_other"]}, brief["dL_other"])


@pytest.mark.slow
def test_every_dde_method_agrees_on_a_neural_delayed_gradient_flow():
    result = sv.compare_sensitivities(delayed_gradient_flow(), init(), loss, saveat=OBS, verbose=False)
    assert set(result.gradients) == {"Backprop", "ForwardMode", "InterpolatingAdjoint", "QuadratureAdjoint",
                                     "finite differences"}
    assert result.worst(exclude=("finite differences",)) <= 1e-6
    fd = result.gradients["finite differences"]
    for name, g in result.gradients.items():
        assert np.max(np.abs(g - fd)) / np.max(np.abs(fd)) <= 1e-5, name
    table = result.table().splitlines()  # every method named in full, numbered as its column
    assert [line.split()[:2] for line in table[2:]] == [[f"({j})", name.split()[0]] for j, name in
                                                        enumerate(result.gradients, 1)], table
    assert table[0].split()[-1] == f"({len(result.gradients)})" and max(map(len, table)) <= 100, table


def test_backsolve_on_a_dde_names_the_alternatives():
    with pytest.raises(ValueError, match="BacksolveAdjoint does not support delay equations.*InterpolatingAdjoint"):
        sv.solve(delayed_gradient_flow(), init(), sensitivity=sv.BacksolveAdjoint())


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", DDE_METHODS, ids=ids)
def test_value_and_grad_in_jit_and_vmap_match_a_loop(sensitivity):
    """The gradient is compared on the scale of its largest entry (5.7 here): the vmapped adjoints
    fold ∫ f_pᵀλ per chunk of steps (_forward._run_chunked) and their sweep's last bits differ
    from the unbatched one's, ~1e-10 of that scale (measured at rtol 1e-6, 1e-8, 1e-10: 1.9e-10,
    4.7e-10, 1.9e-12). dL/dτ is 700x smaller than the largest entry: compared entry by entry at
    1e-9 it failed with 12 checkpoints (1.7e-8) and passed with 16."""
    prob, p = delayed_gradient_flow(), init()
    vg = lambda p: jax.value_and_grad(lambda q: loss(sv.solve(prob, q, saveat=OBS, rtol=1e-8, atol=1e-10,
                                                               sensitivity=sensitivity).ys))(p)
    taus = jnp.array([0.5, 0.9])
    batched = jax.jit(jax.vmap(lambda tau: vg({**p, "tau": tau})))(taus)
    for i, tau in enumerate(taus):
        value, grad = jax.jit(vg)({**p, "tau": tau})
        np.testing.assert_allclose(batched[0][i], value, rtol=1e-12)
        flat, _ = jax.flatten_util.ravel_pytree(grad)
        flat_batched, _ = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], batched[1]))
        np.testing.assert_allclose(flat_batched, flat, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(flat))))


@pytest.fixture
def chunked_calls(monkeypatch):
    """A list that grows each time a loop runs with the chunked parameter integral."""
    from solvers import _forward

    calls, chunked = [], _forward._run_chunked
    monkeypatch.setattr(_forward, "_run_chunked", lambda *a: calls.append(1) or chunked(*a))
    return calls


def _mlp_hamiltonian_problem(x0):
    def H(x, p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.sum(h @ p["w2"])

    return sv.ODEProblem(sv.GradientField(H, sv.canonical_hamiltonian_j(2)), x0, 0.0, 3.0)


@pytest.mark.parametrize("sensitivity", [sv.BacksolveAdjoint(), sv.InterpolatingAdjoint(checkpoints=2),
                                         sv.QuadratureAdjoint()], ids=ids)
@pytest.mark.slow
def test_vmapped_trajectories_take_the_chunked_parameter_integral_and_match_a_loop(sensitivity, chunked_calls):
    """Under vmap (parameters shared, one initial state per trajectory) the continuous adjoints
    fold ∫ f_pᵀλ in per chunk of steps (_forward._run_chunked) instead of at every stage: the
    summed gradient and the per-trajectory gradients equal those of one solve at a time."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    p = {"w1": jax.random.normal(k1, (2, 8)), "b1": jax.random.normal(k2, (8,)) * 0.1,
         "w2": jax.random.normal(k3, (8, 1)) / 3}
    x0s = jnp.array([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]])
    obs = jnp.linspace(0.5, 3.0, 6)
    L = lambda p, x0: jnp.sum(sv.solve(_mlp_hamiltonian_problem(x0), p, saveat=obs, rtol=1e-9, atol=1e-11,
                                       sensitivity=sensitivity).ys ** 2)
    grad_one = jax.jit(jax.grad(L))  # compiled once for the three trajectories
    one_at_a_time = [grad_one(p, x0) for x0 in x0s]
    assert not chunked_calls  # no vmap: the parameter integral rides along at every stage
    summed = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(L, in_axes=(None, 0))(p, x0s))))(p)
    per_trajectory = jax.jit(jax.vmap(jax.grad(L), in_axes=(None, 0)))(p, x0s)
    assert chunked_calls
    close = lambda a, b: float(jnp.max(jnp.abs(a - b))) <= 1e-10 * float(jnp.max(jnp.abs(b)))  # same steps, another sum order
    for k in p:
        assert close(summed[k], sum(g[k] for g in one_at_a_time)), k
        for i, g in enumerate(one_at_a_time):
            assert close(per_trajectory[k][i], g[k]), (k, i)


@pytest.mark.parametrize("sensitivity", [sv.BacksolveAdjoint(), sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()],
                         ids=ids)
@pytest.mark.slow
def test_vmapped_hessian_vector_products_take_the_chunked_path(sensitivity, chunked_calls):
    """vmap of jax.jvp(jax.grad(...)): the batch tracer sits inside the JVP tracer, and the
    backward pass still sees it (chunked parameter integral); values equal a loop."""
    p = {"w1": jnp.array([[0.5, -0.3, 0.8], [0.2, 0.7, -0.4]]), "b1": jnp.array([0.1, -0.2, 0.05]),
         "w2": jnp.array([[0.6], [-0.5], [0.3]])}
    v = jax.tree_util.tree_map(lambda a: 0.1 * jnp.ones_like(a), p)
    x0s = jnp.array([[0.3, 0.1], [0.5, -0.4]])
    L = lambda p, x0: jnp.sum(sv.solve(_mlp_hamiltonian_problem(x0), p, saveat=jnp.linspace(0.5, 3.0, 4), rtol=1e-10,
                                       atol=1e-12, sensitivity=sensitivity).ys ** 2)
    hvp = lambda x0: jax.jvp(lambda q: jax.grad(L)(q, x0), (p,), (v,))[1]
    batched = jax.jit(jax.vmap(hvp))(x0s)
    assert chunked_calls
    hvp_one = jax.jit(hvp)  # compiled once for both trajectories
    for i, x0 in enumerate(x0s):
        one = hvp_one(x0)
        for k in p:
            scale = float(jnp.max(jnp.abs(one[k])))
            assert float(jnp.max(jnp.abs(batched[k][i] - one[k]))) <= 1e-10 * scale, (k, i)


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_float32_gradients(refcases, sensitivity):
    case = refcases["A_cont"]
    p32 = {k: jnp.asarray(v, jnp.float32) for k, v in case["params"].items()}
    prob = linear_dde(case["T"]) if not isinstance(sensitivity, sv.BacksolveAdjoint) else None
    if prob is None:
        E = refcases["E"]
        L = lambda p: jnp.sum(sv.solve(pendulum(), p, rtol=1e-6, atol=1e-7, sensitivity=sensitivity).ys[-1] ** 2)
        g = jax.jit(jax.grad(L))({"m": jnp.float32(1.0), "k": jnp.float32(2.0), "q0": jnp.float32(1.0)})
        assert g["k"].dtype == jnp.float32
        assert_close(g, E["grad_L"], rel=2e-3)
        return
    ts = jnp.array(case["obs_times"], jnp.float32)
    L = lambda p: 0.5 * jnp.sum(sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-7, sensitivity=sensitivity).ys ** 2)
    g = jax.jit(jax.grad(L))(p32)
    assert g["tau"].dtype == jnp.float32
    assert_close(g, case["grad_L"], rel=2e-3)


@pytest.mark.parametrize("nodes", [2, 3, 4, 5, 6])
def test_quadrature_nodes_at_a_loose_tolerance(refcases, nodes):
    """Every node count at rtol 1e-6 (float64): a variant of the backward sweep that XLA compiled
    differently once returned dL/da = -0.38 (exact 0.18) for nodes = 4 only, every other
    gradient right; this pins each node count to the exact gradient."""
    case = refcases["A_cont"]
    ts = jnp.array(case["obs_times"])
    L = lambda p: 0.5 * jnp.sum(sv.solve(linear_dde(case["T"]), p, saveat=ts, rtol=1e-6, atol=1e-7,
                                         sensitivity=sv.QuadratureAdjoint(nodes)).ys ** 2)
    assert_close(jax.jit(jax.grad(L))(refcase_params(case)), case["grad_L"], rel=1e-4)


@pytest.mark.slow
def test_settings_in_p_and_python_floats(refcases):
    """p may hold settings next to its parameters: an int, a bool, an int array. ForwardMode and
    the continuous adjoints differentiate every leaf they are given and failed on them ("jacfwd
    requires real-valued inputs", "float0 is not a valid dtype"); Backprop alone worked. A Python
    float as p, with a problem function closing over a jitted value, failed too ("Closure-converted
    function called with different dynamic arguments"). Every method now agrees with Backprop."""
    H = lambda x, p: (x[1] ** 2 / (2 * p["m"]) + p["k"] * (1 - jnp.cos(x[0]))) * (1.0 if p["on"] else 0.5)
    extra = lambda t, x, p: -p["g"] * p["n"] * x
    field = sv.GradientField(H, sv.canonical_hamiltonian_j(2), extra)
    ode = sv.ODEProblem(field, jnp.array([1.0, 0.0]), 0.0, 5.0)
    settings = {"on": True, "n": jnp.asarray(3)}
    L = lambda q, s: jnp.sum(sv.solve(ode, dict(q, **settings), saveat=jnp.array([2.0, 5.0]), rtol=1e-10,
                                      atol=1e-12, sensitivity=s).ys ** 2)
    q = {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "g": jnp.asarray(0.05)}
    ref = jax.jit(jax.grad(lambda q: L(q, sv.Backprop())))(q)
    for s in ODE_METHODS[1:]:
        assert_close(jax.jit(jax.grad(lambda q: L(q, s)))(q), {k: float(v) for k, v in ref.items()}, 1e-8, repr(s))

    case = refcases["A_jump"]
    p = refcase_params(case)

    def dde_loss(c, s):  # p = b, a Python float; the history closes over c, traced under jit
        rhs = lambda t, x, lag, b: p["a"] * x + b * lag[0]
        prob = sv.DDEProblem(rhs, lambda t, b: c * jnp.ones_like(t), lambda b: jnp.stack([p["tau"]]), 0.0,
                             case["T"], x0=p["x0"])
        return sv.solve(prob, float(p["b"]), rtol=1e-10, atol=1e-12, sensitivity=s).ys[-1]
    for s in DDE_METHODS:
        got = float(jax.jit(jax.grad(lambda c: dde_loss(c, s)))(p["c"]))
        assert abs(got - case["grad_xT"]["c"]) <= 1e-6 * abs(case["grad_xT"]["c"]), repr(s)


@pytest.mark.slow
def test_fixed_step_gradients_converge_at_the_methods_order(refcases):
    """Euler and RK4 with constant steps: every method's gradient error against the exact one
    halves (Euler) or drops ~16x (RK4) when dt halves. The adjoints' backward sweep took
    Hairer's starting-step estimate as its constant step instead of dt0 (RK4: an error that
    did not follow dt; Euler: the step budget ran out), and a DDE with Euler failed outright
    ("Need at least one array to stack": a tableau without later stages). ForwardMode is left
    out: it differentiates the very solve Backprop does, forward instead of in reverse (the two
    agree to 1e-9 in test_dense_output_saves_backprop_matches_forward_mode_and_fd)."""
    case = refcases["A_jump"]
    p, obs = refcase_params(case), jnp.array(case["obs_times"])
    methods = [s for s in DDE_METHODS if not isinstance(s, sv.ForwardMode)]
    for solver, dts, lo, hi in ((sv.Euler(), (0.02, 0.01), 1.7, 2.3), (sv.RK4(), (0.2, 0.1), 12.0, 32.0)):
        for s in methods:
            fn = jax.jit(jax.grad(lambda p, dt: 0.5 * jnp.sum(sv.solve(
                linear_dde(case["T"]), p, saveat=obs, solver=solver, dt0=dt, sensitivity=s, history_size=4096).ys ** 2)))
            err = [max(abs(float(g[k]) - v) / abs(v) for k, v in case["grad_L"].items())
                   for g in (fn(p, dt) for dt in dts)]
            assert lo <= err[0] / err[1] <= hi, (solver.name, repr(s), err)
    a, x0, T = 0.7, 1.3, 2.0  # ODE x' = -a x, L = x(T)²/2: dL/da = -T x0² e^{-2aT}
    exact = -T * x0**2 * np.exp(-2 * a * T)
    resolved = (sv.InterpolatingAdjoint(checkpoints=4), 3)  # a buffer of 3 steps: earlier segments re-solved
    for s, size in [(s, 4096) for s in ODE_METHODS if not isinstance(s, sv.ForwardMode)] + [resolved]:
        fn = jax.jit(jax.grad(lambda a, dt: 0.5 * sv.solve(sv.ODEProblem(lambda t, x, a: -a * x, jnp.array([x0]), 0.0, T),
                                                          a, solver=sv.RK4(), dt0=dt, sensitivity=s,
                                                          history_size=size).ys[-1, 0] ** 2))
        err = [abs(float(fn(a, dt)) - exact) for dt in (0.4, 0.2)]
        assert 12.0 <= err[0] / err[1] <= 32.0, (repr(s), err)

    # the value under jax.grad is the plain solve's, bit for bit: InterpolatingAdjoint's checkpoints
    # were stops of their own and changed the steps (constant: 0.4 -> 0.125; adaptive: one more each).
    # Adaptive Backprop on a DDE takes the steps of a solve whose control also sees the tangent
    # (solvers/_directional.py): another discrete solution, within the tolerance of the plain one
    dde = linear_dde(case["T"])
    for kw in ({"solver": sv.RK4(), "dt0": 0.4}, {"rtol": 1e-6}):
        plain = sv.solve(dde, p, history_size=4096, **kw).ys
        for s in methods:
            value = jax.value_and_grad(lambda p: sv.solve(dde, p, sensitivity=s, history_size=4096, **kw).ys[-1])(p)[0]
            if isinstance(s, sv.Backprop) and "rtol" in kw:
                assert abs(float(value - plain[-1])) <= kw["rtol"] * abs(float(plain[-1])), (repr(s), kw)
            else:
                assert float(value) == float(plain[-1]), (repr(s), kw, float(value - plain[-1]))


class _DelayedMLP(eqx.Module):
    mlp: eqx.nn.MLP  # holds its activation, a function, as a pytree leaf
    tau: jax.Array


@pytest.mark.slow
def test_dde_with_an_equinox_module_as_p():
    """p an eqx.nn.MLP (and a learned delay) as in the seed thread: every DDE method failed with
    "Error interpreting argument ... as an abstract array" (the activation function is a leaf of
    p, and reading whether the delays are traced traced all of p's leaves). ODEs were fine."""
    mlp = eqx.nn.MLP(4, 2, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0), dtype=jnp.float64)
    prob = sv.DDEProblem(lambda t, x, lag, m: m.mlp(jnp.concatenate([x, lag[0]])) - x,
                         lambda t, m: jnp.array([1.0, 0.5]), lambda m: jnp.stack([m.tau, 2 * m.tau]), 0.0, 2.0)
    L = lambda m, s, tol=1e-10: jnp.sum(sv.solve(prob, m, saveat=jnp.array([0.7, 1.5, 2.0]), rtol=tol,
                                                 atol=tol * 1e-2, sensitivity=s).ys ** 2)
    m = _DelayedMLP(mlp, jnp.asarray(0.45))
    flat = lambda g: jax.flatten_util.ravel_pytree(eqx.filter(g, eqx.is_inexact_array))[0]
    ref = flat(eqx.filter_jit(eqx.filter_grad(lambda m: L(m, sv.Backprop())))(m))
    value = jax.jit(lambda tau: L(_DelayedMLP(mlp, tau), sv.Backprop(), 1e-12))
    fd_tau = (value(m.tau + 1e-5) - value(m.tau - 1e-5)) / 2e-5
    assert abs(float(ref[-1] - fd_tau)) <= 1e-6 * abs(float(fd_tau)), (float(ref[-1]), float(fd_tau))
    for s in DDE_METHODS[1:]:
        g = flat(eqx.filter_grad(lambda m: L(m, s))(m))
        assert float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref))) <= 1e-6, repr(s)


def test_compare_sensitivities_leaves_settings_alone():
    """An int in p was raveled with the parameters: finite differences perturbed it through a
    cast back to int and the table showed every method 1.0 (relative) away from them."""
    prob = sv.ODEProblem(lambda t, x, p: -(p["w"] * p["n"]) * x, jnp.ones(2), 0.0, 1.0)
    result = sv.compare_sensitivities(prob, {"w": 0.9, "n": 2}, lambda ys: jnp.sum(ys**2),
                                      saveat=jnp.array([0.5, 1.0]), repeats=1, verbose=False)
    exact = -2 * 2 * sum(2 * s * jnp.exp(-2 * 1.8 * s) for s in (0.5, 1.0))  # d/dw of 2 Σ e^{-2 n w s}
    for name, g in result.gradients.items():
        assert g.shape == (1,) and abs(float(g[0]) - float(exact)) < 1e-7 * abs(float(exact)), name
    assert result.worst() < 1e-8


def test_compare_sensitivities_takes_a_list_of_methods_and_names_a_bad_one():
    """methods=[sv.Backprop(), ...] failed with "cannot convert dictionary update sequence
    element #0 to a sequence"; a list is now named by repr, and a non-sensitivity is named."""
    prob = sv.ODEProblem(lambda t, x, p: p * x, jnp.ones(1), 0.0, 1.0)
    L = lambda ys: jnp.sum(ys)
    chosen = [sv.Backprop(), sv.InterpolatingAdjoint(checkpoints=2)]
    result = sv.compare_sensitivities(prob, -0.5, L, methods=chosen, repeats=1, verbose=False)
    assert list(result.gradients) == [repr(s) for s in chosen] + ["finite differences"]
    for g in result.gradients.values():
        assert abs(float(g[0]) - float(jnp.exp(-0.5))) < 1e-6  # d/dp e^p at p = -0.5
    with pytest.raises(TypeError, match=r"methods\['adjoint'\] must be a sensitivity such as Backprop\(\)"):
        sv.compare_sensitivities(prob, -0.5, L, methods={"adjoint": "interpolating"}, verbose=False)


def test_compare_sensitivities_reports_a_method_that_fails_and_compares_the_others():
    """40 observations on [0, 1] where the forward needs a handful of steps (land_on_saveat=False):
    max_steps=30 is enough for the forward but not for an adjoint's backward sweep, which stops at
    every observation. The comparison used to stop at the first failing method; now the adjoints'
    error is in the table and in ``errors``, the others are compared, and ``worst`` refuses to
    answer without being told to leave the failed methods out."""
    prob = sv.ODEProblem(lambda t, x, p: -p["w"] * x, jnp.ones(2), 0.0, 1.0)
    obs = jnp.linspace(0.025, 1.0, 40)
    result = sv.compare_sensitivities(prob, {"w": 0.9}, lambda ys: jnp.sum(ys**2), saveat=obs, repeats=1,
                                      verbose=False, max_steps=30, land_on_saveat=False)
    adjoints = ("InterpolatingAdjoint", "QuadratureAdjoint", "BacksolveAdjoint")
    assert set(result.errors) == set(adjoints)
    assert all("step budget exhausted" in message for message in result.errors.values()), result.errors
    assert set(result.gradients) == {"Backprop", "ForwardMode", "finite differences"}
    exact = -2 * sum(2 * s * np.exp(-2 * 0.9 * s) for s in np.asarray(obs))  # d/dw of 2 Σ e^{-2 w s}
    for name, g in result.gradients.items():
        assert abs(float(g[0]) - exact) < 1e-6 * abs(exact), name
    table = result.table()
    assert all(f"{name}: failed: " in table for name in adjoints), table
    with pytest.raises(ValueError, match="InterpolatingAdjoint, QuadratureAdjoint, BacksolveAdjoint failed"):
        result.worst()
    assert result.worst(exclude=adjoints) < 1e-6


def test_compare_sensitivities_names_a_float32_state_and_a_non_scalar_loss():
    """A float32 state failed in every method with the rhs's dtype error (p is compared in
    float64); a loss of shape (1, 2) failed with JAX's "Gradient only defined for scalar-output
    functions". A float32 p with x0 built from p stays comparable (its state is float64 there)."""
    rhs = lambda t, x, p: -p["a"] * x
    f32 = sv.ODEProblem(rhs, jnp.ones(2, jnp.float32), 0.0, 1.0)
    with pytest.raises(ValueError, match="compares gradients in float64 .* the problem's state is float32"):
        sv.compare_sensitivities(f32, {"a": jnp.float32(0.5)}, jnp.sum, verbose=False)
    prob = sv.ODEProblem(rhs, lambda p: p["x0"] * jnp.ones(2), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"loss\(ys\) must return a scalar; for ys of shape \(3, 2\) it returned "
                                         r"shape \(2,\)"):
        sv.compare_sensitivities(prob, {"a": 0.5, "x0": 1.0}, lambda ys: ys[-1], saveat=jnp.array([0.2, 0.5, 1.0]))
    result = sv.compare_sensitivities(prob, {"a": jnp.float32(0.5), "x0": jnp.float32(1.0)}, jnp.sum,
                                      methods=[sv.Backprop()], repeats=1, verbose=False)
    assert np.allclose(result.gradients[repr(sv.Backprop())], [-2 * np.exp(-0.5), 2 * np.exp(-0.5)], rtol=1e-9)


def test_compare_sensitivities_raises_when_every_method_fails():
    prob = sv.ODEProblem(lambda t, x, p: -p["w"] * x, jnp.ones(2), 0.0, 1.0)
    with pytest.raises(Exception, match="step budget exhausted"):
        sv.compare_sensitivities(prob, {"w": 0.9}, lambda ys: jnp.sum(ys**2), saveat=jnp.array([1.0]), repeats=1,
                                 verbose=False, max_steps=1)

def test_sensitivity_arguments_are_checked():
    with pytest.raises(ValueError, match="checkpoints must be a positive int, got 0"):
        sv.InterpolatingAdjoint(checkpoints=0)
    with pytest.raises(ValueError, match="nodes must be an int in 1..8"):
        sv.QuadratureAdjoint(nodes=20)
    with pytest.raises(ValueError, match="nodes must be an int in 1..8, got True"):  # a bool is no count
        sv.QuadratureAdjoint(nodes=True)
    with pytest.raises(TypeError, match="sensitivity must be one of"):
        sv.solve(pendulum(), {"m": 1.0, "k": 2.0, "q0": 1.0}, sensitivity="adjoint")


def _checkpoint_times(prob, p, obs, n):
    from solvers._setup import Options

    opts = Options(sv.Tsit5().tableau, sv.PIController(), 1e-8, 1e-10, 4096, None, 256, True, True)
    return np.asarray(interpolating_module.checkpoint_targets(prob, p, obs, opts, sv.InterpolatingAdjoint(n)))


def test_interpolating_checkpoints_sit_on_times_both_sweeps_land_on(refcases):
    """Interior checkpoints move to the nearest observation or forward breakpoint within half a
    segment (no extra landing); with none near they stay on the uniform grid."""
    p = refcase_params(refcases["A_jump"])  # tau = 1: forward breakpoints 1, 2, 3
    obs = jnp.array(refcases["A_jump"]["obs_times"])  # 0.5, 1.2, 1.7, 2.5, 3.5 = T
    np.testing.assert_array_equal(_checkpoint_times(linear_dde(3.5), p, obs, 4), [0.0, 1.0, 1.7, 2.5, 3.5])
    q = {"m": 1.0, "k": 2.0, "q0": 1.0}
    np.testing.assert_array_equal(_checkpoint_times(pendulum(), q, jnp.array([10.0]), 4), [0.0, 2.5, 5.0, 7.5, 10.0])


@pytest.mark.slow
def test_interpolating_adjoint_with_two_checkpoints_on_one_observation():
    """Targets 2.5 and 5 are both half a segment from the observation 3.75: both move there,
    leaving an empty segment, which the forward and backward sweeps must step over."""
    q = {"m": 1.0, "k": 2.0, "q0": 1.0}
    obs = jnp.array([3.75, 10.0])
    np.testing.assert_array_equal(_checkpoint_times(pendulum(), q, obs, 4), [0.0, 3.75, 3.75, 7.5, 10.0])
    grads = []
    for s in (sv.InterpolatingAdjoint(checkpoints=4), sv.QuadratureAdjoint(), sv.Backprop()):
        L = lambda p: jnp.sum(sv.solve(pendulum(), p, saveat=obs, rtol=1e-10, atol=1e-12, sensitivity=s).ys ** 2)
        grads.append(jax.jit(jax.grad(L))(q))
    for other in grads[1:]:
        assert_close(grads[0], {k: float(v) for k, v in other.items()})


def test_adjoint_segment_too_long_for_history_says_what_to_raise(refcases):
    case = refcases["A_jump"]
    L = lambda p: sv.solve(linear_dde(), p, rtol=1e-10, atol=1e-12, history_size=16,
                           sensitivity=sv.InterpolatingAdjoint(checkpoints=1)).ys[-1]
    with pytest.raises(Exception, match="history buffer full.*checkpoints"):
        jax.grad(L)(refcase_params(case))


@pytest.mark.slow
def test_checkpoint_windows_that_overflow_the_log_say_what_to_raise(refcases):
    """T = 16, τ = 1, 40 steps: 16 checkpoints a delay apart keep nearly every step in their
    windows, more than history_size = 24; 8 checkpoints keep fewer and get the gradient of the
    default history size. Jitted, and the loss linear in ys: the check on ys alone is compiled
    away, and the gradient came out with no error until the reverse pass checked the forward's
    status too."""
    p = refcase_params(refcases["A_jump"])
    grad = lambda n, size: eqx.filter_jit(jax.grad(lambda p: sv.solve(
        linear_dde(16.0), p, rtol=1e-5, atol=1e-7, history_size=size,
        sensitivity=sv.InterpolatingAdjoint(checkpoints=n)).ys[-1]))(p)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"history_size=24 steps.*fewer checkpoints"):
        grad(16, 24)
    assert_close(grad(8, 24), {k: float(v) for k, v in grad(8, 256).items()})


def test_compare_needs_float64():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="needs float64"):
            sv.compare_sensitivities(delayed_gradient_flow(), init(), loss, saveat=OBS)
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["pendulum", "neural_dde"])
def test_dense_output_saves_backprop_matches_forward_mode_and_fd(problem):
    """land_on_saveat=False: several save times inside one step, read from the dense output.
    Backprop (saves written by an inner checkpointed loop into a buffer) and ForwardMode
    differentiate the same discrete solution; both agree with central differences."""
    if problem == "pendulum":
        prob, p = pendulum(), {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "q0": jnp.asarray(1.0)}
        ts = jnp.linspace(0.0, 10.0, 37)
    else:
        prob, p = delayed_gradient_flow(), init()
        ts = jnp.linspace(0.0, 3.0, 23)

    def L(p, sens):
        ys = sv.solve(prob, p, saveat=ts, rtol=1e-10, atol=1e-12, sensitivity=sens, land_on_saveat=False).ys
        return jnp.sum(jnp.sin(ys)) + 0.5 * jnp.sum(ys**2)

    flat, unravel = jax.flatten_util.ravel_pytree(p)
    g_bp = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(lambda p: L(p, sv.Backprop())))(p))[0]
    g_fm = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(lambda p: L(p, sv.ForwardMode())))(p))[0]
    assert float(jnp.max(jnp.abs(g_bp - g_fm)) / jnp.max(jnp.abs(g_fm))) < 1e-9
    f = jax.jit(lambda x: L(unravel(x), sv.Backprop()))
    eps = 1e-6
    fd = np.array([(f(flat.at[i].add(eps)) - f(flat.at[i].add(-eps))) / (2 * eps) for i in range(flat.size)])
    assert float(np.max(np.abs(np.asarray(g_bp) - fd)) / np.max(np.abs(fd))) < 1e-5


@pytest.mark.parametrize("sensitivity", ODE_METHODS + [sv.Backprop(checkpoints=16)], ids=ids)
def test_a_rejected_step_that_overflowed(sensitivity):
    """x' = -p x³ from x0 = 10 with dt0 = 1: the first attempts overflow (stages of ±inf) and
    are rejected. The adjoints and ForwardMode never differentiate a rejected attempt and give
    the exact gradient, x(t) = (x0⁻² + 2pt)^(-1/2), ∂x/∂p = -t x³, ∂x/∂x0 = (x/x0)³, also
    under vmap next to a trajectory that never overflows. So does Backprop() on an ODE, whose
    reverse pass skips rejected attempts (_reverse_loop). With checkpoints (equinox's loop)
    Backprop would multiply the attempt's zero cotangent by infinite stage derivatives (NaN
    everywhere, what it returned before): it stops with an error that names the alternatives
    instead."""
    prob = sv.ODEProblem(lambda t, x, p: -p["p"] * x**3, lambda p: p["x0"], 0.0, 1.0)
    p = {"p": jnp.asarray(1.0), "x0": jnp.array([10.0])}
    solve = lambda p: sv.solve(prob, p, dt0=1.0, rtol=1e-10, atol=1e-12, sensitivity=sensitivity)
    assert int(jax.jit(lambda p: solve(p).stats["rejected"])(p)) >= 3
    grad = jax.jit(jax.grad(lambda p: solve(p).ys[-1, 0]))
    x0s = jnp.array([[10.0], [0.5]])
    grad_v = jax.jit(jax.vmap(jax.grad(lambda q, x0: solve({"p": q, "x0": x0}).ys[-1, 0]), (None, 0)))
    if isinstance(sensitivity, sv.Backprop) and sensitivity.checkpoints is not None:
        # (under vmap the error reaches Python through XLA's callback, as a JaxRuntimeError)
        for run in (lambda: grad(p), lambda: grad_v(p["p"], x0s)):
            with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError),
                               match="rejected step attempt overflowed.*InterpolatingAdjoint"):
                jax.block_until_ready(run())
        small = {"p": jnp.asarray(1.0), "x0": jnp.array([0.5])}  # no overflow: no error
        x = (1 / 0.25 + 2.0) ** -0.5
        assert_close({"p": grad(small)["p"]}, {"p": -x**3}, rel=1e-7)
        return
    g = grad(p)
    x = (1 / 100 + 2.0) ** -0.5
    assert_close({"p": g["p"], "x0": g["x0"][0]}, {"p": -x**3, "x0": (x / 10) ** 3}, rel=1e-7)
    gv = grad_v(p["p"], x0s)
    xs = (1 / x0s[:, 0] ** 2 + 2.0) ** -0.5
    assert_close(dict(enumerate(gv)), dict(enumerate(-xs**3)), rel=1e-7)


@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_gradient_with_respect_to_save_times(refcases, sensitivity):
    """d x(s)/ds = x'(s): for x' = -p x every method gives -p x0 e^(-p s) at the save time that
    moves, jitted and under vmap over s (ForwardMode and the adjoints returned 0 here). For a
    DDE, x' can jump at a save time: Backprop differentiates the discrete solution (central
    differences agree), the others refuse with an error naming Backprop."""
    prob = sv.ODEProblem(lambda t, x, p: -p * x, jnp.array([1.0, 2.0]), 0.0, 2.0)
    L = lambda s, p: jnp.sum(sv.solve(prob, p, saveat=jnp.stack([s, 1.5, 2.0]), rtol=1e-10, atol=1e-12,
                                      sensitivity=sensitivity).ys[:2])
    exact = lambda s: -0.5 * 3.0 * np.exp(-0.5 * s)
    g_s, g_p = jax.jit(jax.grad(L, argnums=(0, 1)))(1.0, 0.5)
    assert abs(float(g_s) - exact(1.0)) < 1e-7 * abs(exact(1.0))
    assert abs(float(g_p) - (-3.0 * np.exp(-0.5) - 2 * 1.5 * 3.0 * np.exp(-0.75) / 2)) < 1e-7 * 5
    ss = jnp.array([0.0, 0.25, 1.25])  # a save time on t0: x'(t0) (Backprop returned 0 there)
    g_v = jax.jit(jax.vmap(jax.grad(L), (0, None)))(ss, 0.5)
    np.testing.assert_allclose(np.asarray(g_v), exact(np.asarray(ss)), rtol=1e-7)

    case = refcases["A_cont"]
    dde = lambda s: sv.solve(linear_dde(3.5), refcase_params(case), saveat=jnp.stack([s, 3.5]), rtol=1e-10,
                             atol=1e-12, sensitivity=sensitivity).ys[0]
    if not isinstance(sensitivity, sv.Backprop):
        refusal = "does not support delay" if isinstance(sensitivity, sv.BacksolveAdjoint) else "save times.*Backprop"
        with pytest.raises(ValueError, match=refusal):
            jax.grad(dde)(1.3)
        return
    eps, value, grad = 1e-5, jax.jit(dde), jax.jit(jax.grad(dde))  # each compiled once
    fd = (value(1.3 + eps) - value(1.3 - eps)) / (2 * eps)
    assert abs(float(grad(1.3)) - float(fd)) < 1e-5 * abs(float(fd))
    q = case["params"]  # on t0: the right derivative x'(0⁺) = a x0 + b c
    assert abs(float(grad(0.0)) - (q["a"] * q["x0"] + q["b"] * q["c"])) < 1e-12


def test_a_relu_rhs_where_the_discrete_gradient_is_off_and_the_adjoints_are_not():
    """A neural ODE with a ReLU MLP (equinox's default activation): one hidden unit's input
    crosses 0 on the way, so the rhs has a kink there. Central differences of a solve at rtol
    1e-13 are the reference (eps 1e-4; they move by 3e-6 relative between eps 1e-4 and 1e-5).
    At rtol 1e-10 the continuous adjoints agree with them to 1.2e-5 relative in every one of
    the 4 entries where methods disagree most, and with each other; Backprop (the exact
    derivative of the discrete solution, which ForwardMode and diffrax's
    RecursiveCheckpointAdjoint give too) is off by 0.65%: a step across the kink integrates
    the sensitivities to low order, and the step control watches x alone (README)."""
    model = eqx.nn.MLP(2, 2, 8, 2, activation=jax.nn.relu, key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    flat, unravel = jax.flatten_util.ravel_pytree(eqx.filter(model, eqx.is_array))
    static = eqx.filter(model, eqx.is_array, inverse=True)
    prob = sv.ODEProblem(lambda t, x, v: eqx.combine(unravel(v), static)(x), jnp.array([1.0, 0.5]), 0.0, 1.0)
    L = lambda v, s, rtol: jnp.sum(sv.solve(prob, v, saveat=jnp.array([0.5, 1.0]), rtol=rtol, atol=rtol * 1e-2,
                                            sensitivity=s, max_steps=100000).ys ** 2)
    grads = {type(s).__name__: np.asarray(jax.jit(jax.grad(lambda v: L(v, s, 1e-10)))(flat))
             for s in (sv.Backprop(), sv.BacksolveAdjoint(), sv.InterpolatingAdjoint(), sv.QuadratureAdjoint())}
    worst = np.argsort(-np.abs(grads["Backprop"] - grads["InterpolatingAdjoint"]))[:4]
    reference = jax.jit(lambda v: L(v, sv.Backprop(), 1e-13))
    fd = np.array([(reference(flat.at[i].add(1e-4)) - reference(flat.at[i].add(-1e-4))) / 2e-4 for i in worst])
    for name, g in grads.items():
        error = np.max(np.abs(g[worst] - fd) / np.abs(fd))
        assert (error > 1e-3) if name == "Backprop" else (error < 3e-5), (name, error)
