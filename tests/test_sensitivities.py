"""Gradients by every method against exact values, each other and finite differences."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
import solvers.sensitivity._adjoint as adjoint_module
from helpers import linear_dde, pendulum, refcase_params
from models import OBS, delayed_gradient_flow, init, loss

DDE_METHODS = [sv.Backprop(), sv.ForwardMode(), sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()]
ODE_METHODS = DDE_METHODS + [sv.BacksolveAdjoint()]
ids = lambda s: repr(s)


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


def _assert_close(got, exact, rel=1e-6, name=""):
    for k, v in exact.items():
        assert abs(float(got[k]) - v) <= rel * abs(v), (name, k, float(got[k]), v)


def _assert_refcase_gradients(g, case, name):
    """g from _dde_grad_fn: row 0 the gradient of x(T), row 1 that of L."""
    _assert_close({k: v[0] for k, v in g.items()}, case["grad_xT"], name=name)
    _assert_close({k: v[1] for k, v in g.items()}, case["grad_L"], name=name)


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
    _assert_close(g, E["grad_L"])


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
    _assert_close({k: g[k][1] for k in brief["dL_other"]}, brief["dL_other"])


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
        _assert_close(g, E["grad_L"], rel=2e-3)
        return
    ts = jnp.array(case["obs_times"], jnp.float32)
    L = lambda p: 0.5 * jnp.sum(sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-7, sensitivity=sensitivity).ys ** 2)
    g = jax.jit(jax.grad(L))(p32)
    assert g["tau"].dtype == jnp.float32
    _assert_close(g, case["grad_L"], rel=2e-3)


@pytest.mark.parametrize("nodes", [2, 3, 4, 5, 6])
def test_quadrature_nodes_at_a_loose_tolerance(refcases, nodes):
    """Every node count at rtol 1e-6 (float64): a variant of the backward sweep that XLA compiled
    differently once returned dL/da = -0.38 (exact 0.18) for nodes = 4 only, every other
    gradient right; this pins each node count to the exact gradient."""
    case = refcases["A_cont"]
    ts = jnp.array(case["obs_times"])
    L = lambda p: 0.5 * jnp.sum(sv.solve(linear_dde(case["T"]), p, saveat=ts, rtol=1e-6, atol=1e-7,
                                         sensitivity=sv.QuadratureAdjoint(nodes)).ys ** 2)
    _assert_close(jax.jit(jax.grad(L))(refcase_params(case)), case["grad_L"], rel=1e-4)


def _hvp(L, p, v):
    return jax.jvp(jax.grad(L), (p,), (v,))[1]


@pytest.mark.parametrize("sensitivity, obs", [(sv.ForwardMode(), "refcase"), (sv.ForwardMode(), "on 3τ"),
                                               (sv.ForwardMode(), "3 ulps past 3τ"),
                                               (sv.Backprop(), "refcase"), (sv.Backprop(), "on 3τ"),
                                               (sv.Backprop(), "3 ulps past 3τ"),
                                               (sv.InterpolatingAdjoint(), "refcase"),
                                               (sv.QuadratureAdjoint(), "refcase")], ids=ids)
@pytest.mark.slow
def test_hessian_vector_product_dde(refcases, sensitivity, obs):
    """Against central differences of the gradient. "on 3τ": an observation sits on the
    third-level breakpoint 3τ = 3 (x is C² in τ there). The saved value at a moving breakpoint
    was a first-order Taylor term: its second τ-derivative was off by 3% here (17% on a 5τ
    breakpoint), now it is the step's polynomial at the fixed save time. "3 ulps past 3τ": the
    solver landed on both and took a 3-ulp step between them, through which the second
    τ-derivative was off by 5-6%; now it lands once and reads the save from the next step
    (saves_off_breakpoints). The refcase's
    observations 0.5 and 2.5 sit on the adjoint's backward breakpoints T - 3τ and T - τ: a
    jax.jvp through the continuous sweep was off by 0.05-0.3 in every component (it lands
    once where the two stops move apart with τ); under jax.jvp the DDE adjoints now take the
    reverse pass through the discrete solve. The differenced gradients are the primal output
    of the same jitted program (one compile, not two)."""
    case = refcases["A_jump"]
    p = refcase_params(case)
    on_3tau = {"on 3τ": 3.0, "3 ulps past 3τ": 3.0 + 3 * np.spacing(3.0)}.get(obs)
    ts = jnp.array(case["obs_times"] if obs == "refcase" else [0.5, 1.7, on_3tau, 3.5])
    L = lambda p: 0.5 * jnp.sum(sv.solve(linear_dde(), p, saveat=ts, rtol=1e-10, atol=1e-12,
                                         sensitivity=sensitivity).ys ** 2)
    # "on 3τ" (and past it): a shifted τ adds a step between 3τ and 3 that moves the gradient
    # by O(rtol); a larger step keeps that noise (~1e-10 / eps) below the tolerance
    _assert_hvp_matches_differences(L, p, eps=1e-5 if obs == "refcase" else 1e-4)


def _assert_hvp_matches_differences(L, p, eps):
    """H v of L at p (v_k = 0.1 (k + 1)) against central differences of the gradient along v,
    both from one jitted program (gradient, H v), to 1e-6 absolute."""
    v = {k: jnp.asarray(0.1 * (i + 1)) for i, k in enumerate(p)}
    grad_and_hvp = jax.jit(lambda p: jax.jvp(jax.grad(L), (p,), (v,)))
    hv = grad_and_hvp(p)[1]
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * eps * b, p, v)
    gp, gm = grad_and_hvp(shift(1))[0], grad_and_hvp(shift(-1))[0]
    for k in p:
        assert abs(float(hv[k]) - float((gp[k] - gm[k]) / (2 * eps))) < 1e-6, k


@pytest.mark.parametrize("kind", ["ode", "dde"])
def test_backprop_hessian_vector_product_with_interpolated_saves(refcases, kind):
    """land_on_saveat=False under Backprop: the save times a step passes were written by an inner
    checkpointed loop, a custom VJP inside the outer loop's forward rule, and jax.jvp of jax.grad
    failed ("can't apply forward-mode autodiff (jvp) to a custom_vjp function"). Now a step
    writes at most SAVE_WINDOW of them: the HVP against central differences, and with save
    times 8x denser than the steps, steps land on every 8th and the values match the forward's."""
    from solvers._forward import SAVE_WINDOW

    if kind == "ode":
        prob, p, T = pendulum(), {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "q0": jnp.asarray(1.0)}, 10.0
    else:
        prob, p, T = linear_dde(), refcase_params(refcases["A_jump"]), 3.5
    L = lambda p, ts: 0.5 * jnp.sum(sv.solve(prob, p, saveat=ts, rtol=1e-10, atol=1e-12, land_on_saveat=False,
                                             sensitivity=sv.Backprop()).ys ** 2)
    _assert_hvp_matches_differences(lambda p: L(p, jnp.linspace(0.25, T, 7)), p, eps=1e-5)
    loose = dict(rtol=1e-6, atol=1e-8, land_on_saveat=False)
    steps = int(sv.solve(prob, p, **loose).stats["steps"])
    dense = jnp.linspace(0.0, T, 16 * SAVE_WINDOW * steps)

    def loss_and_solution(q):
        sol = sv.solve(prob, q, saveat=dense, sensitivity=sv.Backprop(), **loose)
        return jnp.sum(sol.ys ** 2), (sol.ys, sol.stats["steps"])

    v = jax.tree_util.tree_map(jnp.ones_like, p)  # the solution as seen under jax.jvp of jax.grad
    (_, (ys, capped_steps)), _ = jax.jit(lambda q: jax.jvp(jax.grad(loss_and_solution, has_aux=True), (q,), (v,)))(p)
    assert int(capped_steps) >= dense.shape[0] // SAVE_WINDOW > 8 * steps
    np.testing.assert_allclose(ys, sv.solve(prob, p, saveat=dense, **loose).ys, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_hessian_vector_product_ode_every_method():
    """Every method's Hessian-vector product agrees. Not jitted on purpose: the one test of
    forward-over-adjoint run op by op, as at an interactive prompt (the others compile it)."""
    p = {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "q0": jnp.asarray(1.0)}
    v = {"m": jnp.asarray(0.1), "k": jnp.asarray(0.2), "q0": jnp.asarray(0.3)}
    results = []
    for sens in ODE_METHODS:
        L = lambda p, s=sens: jnp.sum(sv.solve(pendulum(), p, saveat=jnp.array([5.0, 10.0]), rtol=1e-10,
                                               atol=1e-12, sensitivity=s).ys ** 2)
        results.append(_hvp(L, p, v))
    for r in results[1:]:
        for k in p:
            assert abs(float(r[k]) - float(results[0][k])) < 1e-6 * max(1.0, abs(float(results[0][k])))


@pytest.mark.slow
def test_dde_adjoint_hessian_vector_products_under_vmap(refcases):
    """vmap outside and inside jax.jvp(jax.grad(...)) of a DDE adjoint (the backward pass must
    see the JVP tracer under the batch tracer, or the continuous sweep runs and is wrong):
    equal to Backprop's, trajectory by trajectory."""
    case = refcases["A_jump"]
    p, ts = refcase_params(case), jnp.array(case["obs_times"])
    L = lambda p, x0, s: 0.5 * jnp.sum(sv.solve(linear_dde(), dict(p, x0=x0), saveat=ts, rtol=1e-8, atol=1e-10,
                                                sensitivity=s).ys ** 2)
    v = {k: jnp.asarray(0.1 * (i + 1)) for i, k in enumerate(p)}
    x0s = jnp.array([1.0, 0.8])
    outside = lambda s: jax.jit(jax.vmap(lambda x0: jax.jvp(lambda q: jax.grad(L)(q, x0, s), (p,), (v,))[1]))(x0s)
    inside = jax.jit(lambda p: jax.jvp(lambda q: jax.vmap(lambda x0: jax.grad(L)(q, x0, sv.InterpolatingAdjoint()))(x0s),
                                       (p,), (v,))[1])(p)
    ref = outside(sv.Backprop())
    for got in (outside(sv.InterpolatingAdjoint()), inside):
        for k in ("a", "b", "tau", "c"):
            assert float(jnp.max(jnp.abs(got[k] - ref[k]))) < 1e-8, k


@pytest.mark.slow
def test_dde_adjoint_hessian_vector_product_by_linearize(refcases):
    """jax.linearize of jax.grad traces the backward pass with JAX's linearize tracer, not the
    JVP tracer: it was missed, the continuous sweep ran and the product was off by 0.05-0.3."""
    case = refcases["A_cont"]
    p, ts = refcase_params(case), jnp.array(case["obs_times"])
    L = lambda p, s: 0.5 * jnp.sum(sv.solve(linear_dde(), p, saveat=ts, rtol=1e-8, atol=1e-10, sensitivity=s).ys ** 2)
    v = {k: jnp.asarray(0.1 * (i + 1)) for i, k in enumerate(p)}
    linearized = jax.jit(lambda p: jax.linearize(jax.grad(lambda q: L(q, sv.InterpolatingAdjoint())), p)[1](v))(p)
    ref = jax.jit(lambda p: _hvp(lambda q: L(q, sv.Backprop()), p, v))(p)
    for k in p:
        assert abs(float(linearized[k]) - float(ref[k])) < 1e-8, k


@pytest.mark.slow
def test_jvp_and_jacfwd_of_the_solve(refcases):
    """jax.jvp / jax.jacfwd of the solve itself. Every method's solve was a custom VJP, which JAX
    does not forward-differentiate ("can't apply forward-mode autodiff (jvp) to a custom_vjp
    function"); under jax.jvp alone the solve is now the plain loop, whatever the sensitivity.
    The Jacobian of x(T) is refcase A_jump's exact gradient, jitted (every method) and eager; with
    t1 and a save time in p it matches central differences; a failed solve with throw=False has
    NaN tangents, not zeros."""
    case = refcases["A_jump"]
    p = refcase_params(case)
    x_T = lambda p, s: sv.solve(linear_dde(case["T"]), p, rtol=1e-10, atol=1e-12, sensitivity=s).ys[-1]
    for s in DDE_METHODS:
        _assert_close(jax.jit(jax.jacfwd(lambda p: x_T(p, s)))(p), case["grad_xT"], name=repr(s))
    _assert_close(jax.jacfwd(lambda p: x_T(p, sv.InterpolatingAdjoint()))(p), case["grad_xT"], name="eager")

    def ys(q):  # x at 0.5, at q["s"] and at t1 = q["t1"]
        prob = sv.DDEProblem(linear_dde().rhs, linear_dde().history, linear_dde().delays, 0.0, q["t1"],
                             x0=lambda q: q["x0"])
        return sv.solve(prob, q, saveat=jnp.stack([0.5, q["s"], q["t1"]]), rtol=1e-10, atol=1e-12,
                        sensitivity=sv.ForwardMode()).ys
    q = dict(p, t1=jnp.asarray(3.0), s=jnp.asarray(1.9))
    jac, f, e = jax.jit(jax.jacfwd(ys))(q), jax.jit(ys), 1e-6
    for k in q:
        fd = (f(dict(q, **{k: q[k] + e})) - f(dict(q, **{k: q[k] - e}))) / (2 * e)
        np.testing.assert_allclose(jac[k], fd, rtol=0, atol=1e-7, err_msg=k)
    blowup = sv.ODEProblem(lambda t, x, a: a * x**2, jnp.asarray(1.0), 0.0, 2.0)  # x = 1/(1 - a t)
    y, dy = jax.jvp(lambda a: sv.solve(blowup, a, throw=False).ys, (jnp.asarray(1.0),), (jnp.asarray(1.0),))
    assert np.isnan(y).all() and np.isnan(dy).all()


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", [sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()], ids=ids)
def test_dde_hessian_where_the_solve_cannot_see_jax_jvp(refcases, sensitivity):
    """jax.hessian of a jitted loss and jax.jvp of a jitted gradient trace the solve inside a jit
    with no JVP tracer in sight; an eager jax.jvp of jax.grad traces it inside the program solve
    compiles for itself. In all three the DDE adjoints ran their continuous sweep, and JAX
    differentiated it: silently wrong, d²L/da dτ off by 0.46 on refcase A_jump. The
    sweep is now a custom JVP whose rule is Backprop's reverse pass (as when the forward rule
    sees jax.jvp coming): equal to jax.jit(jax.hessian(L)) with Backprop."""
    case = refcases["A_jump"]
    p, ts = refcase_params(case), jnp.array(case["obs_times"])
    L = lambda p, s: 0.5 * jnp.sum(sv.solve(linear_dde(), p, saveat=ts, rtol=1e-10, atol=1e-12, sensitivity=s).ys ** 2)
    ref = jax.jit(jax.hessian(lambda q: L(q, sv.Backprop())))(p)
    loss = lambda q: L(q, sensitivity)
    v = {k: jnp.asarray(0.1 * (i + 1)) for i, k in enumerate(p)}
    hv_ref = {k: sum(ref[k][j] * v[j] for j in p) for k in p}
    hessian = jax.hessian(jax.jit(loss))(p)
    for k in p:
        for j in p:
            assert abs(float(hessian[k][j]) - float(ref[k][j])) < 1e-8 * max(1.0, abs(float(ref[k][j]))), (k, j)
    for hv in (jax.jvp(jax.jit(jax.grad(loss)), (p,), (v,))[1], jax.jvp(jax.grad(loss), (p,), (v,))[1]):
        for k in p:
            assert abs(float(hv[k]) - float(hv_ref[k])) < 1e-8 * max(1.0, abs(float(hv_ref[k]))), k


@pytest.mark.slow
def test_eager_backprop_hessian_vector_product_with_interpolated_saves():
    """The eager call of test_backprop_hessian_vector_product_with_interpolated_saves: solve
    compiles itself, and inside that program no JVP tracer shows that the reverse pass will be
    forward-differentiated; it failed with JAX's custom_vjp error. The tracers are now read at
    solve's call site."""
    p = {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "q0": jnp.asarray(1.0)}
    v = {"m": jnp.asarray(0.1), "k": jnp.asarray(0.2), "q0": jnp.asarray(0.3)}
    L = lambda p: jnp.sum(sv.solve(pendulum(), p, saveat=jnp.linspace(0.25, 10.0, 7), rtol=1e-10, atol=1e-12,
                                   land_on_saveat=False, sensitivity=sv.Backprop()).ys ** 2)
    eager, jitted = _hvp(L, p, v), jax.jit(lambda q: _hvp(L, q, v))(p)
    for k in p:
        assert abs(float(eager[k]) - float(jitted[k])) < 1e-9 * max(1.0, abs(float(jitted[k]))), k


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
        _assert_close(jax.jit(jax.grad(lambda q: L(q, s)))(q), {k: float(v) for k, v in ref.items()}, 1e-8, repr(s))

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
    ("Need at least one array to stack": a tableau without later stages)."""
    case = refcases["A_jump"]
    p, obs = refcase_params(case), jnp.array(case["obs_times"])
    for solver, dts, lo, hi in ((sv.Euler(), (0.02, 0.01), 1.7, 2.3), (sv.RK4(), (0.2, 0.1), 12.0, 32.0)):
        for s in DDE_METHODS:
            fn = jax.jit(jax.grad(lambda p, dt: 0.5 * jnp.sum(sv.solve(
                linear_dde(case["T"]), p, saveat=obs, solver=solver, dt0=dt, sensitivity=s, history_size=4096).ys ** 2)))
            err = [max(abs(float(g[k]) - v) / abs(v) for k, v in case["grad_L"].items())
                   for g in (fn(p, dt) for dt in dts)]
            assert lo <= err[0] / err[1] <= hi, (solver.name, repr(s), err)
    a, x0, T = 0.7, 1.3, 2.0  # ODE x' = -a x, L = x(T)²/2: dL/da = -T x0² e^{-2aT}
    exact = -T * x0**2 * np.exp(-2 * a * T)
    resolved = (sv.InterpolatingAdjoint(checkpoints=4), 3)  # a buffer of 3 steps: earlier segments re-solved
    for s, size in [(s, 4096) for s in ODE_METHODS] + [resolved]:
        fn = jax.jit(jax.grad(lambda a, dt: 0.5 * sv.solve(sv.ODEProblem(lambda t, x, a: -a * x, jnp.array([x0]), 0.0, T),
                                                          a, solver=sv.RK4(), dt0=dt, sensitivity=s,
                                                          history_size=size).ys[-1, 0] ** 2))
        err = [abs(float(fn(a, dt)) - exact) for dt in (0.4, 0.2)]
        assert 12.0 <= err[0] / err[1] <= 32.0, (repr(s), err)

    # the value under jax.grad is the plain solve's, bit for bit: InterpolatingAdjoint's checkpoints
    # were stops of their own and changed the steps (constant: 0.4 -> 0.125; adaptive: one more each)
    dde = linear_dde(case["T"])
    for kw in ({"solver": sv.RK4(), "dt0": 0.4}, {"rtol": 1e-6}):
        plain = sv.solve(dde, p, history_size=4096, **kw).ys
        for s in DDE_METHODS:
            value = jax.value_and_grad(lambda p: sv.solve(dde, p, sensitivity=s, history_size=4096, **kw).ys[-1])(p)[0]
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


def test_sensitivity_arguments_are_checked():
    with pytest.raises(ValueError, match="checkpoints must be a positive int, got 0"):
        sv.InterpolatingAdjoint(checkpoints=0)
    with pytest.raises(ValueError, match="nodes must be an int in 1..8"):
        sv.QuadratureAdjoint(nodes=20)
    with pytest.raises(TypeError, match="sensitivity must be one of"):
        sv.solve(pendulum(), {"m": 1.0, "k": 2.0, "q0": 1.0}, sensitivity="adjoint")


def _checkpoint_times(prob, p, obs, n):
    from solvers._setup import Options

    opts = Options(sv.Tsit5().tableau, sv.PIController(), 1e-8, 1e-10, 4096, None, 256, True, True)
    return np.asarray(adjoint_module._checkpoint_times(prob, p, obs, opts, sv.InterpolatingAdjoint(n)))


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
        _assert_close(grads[0], {k: float(v) for k, v in other.items()})


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
    _assert_close(grad(8, 24), {k: float(v) for k, v in grad(8, 256).items()})


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


@pytest.mark.parametrize("sensitivity", ODE_METHODS, ids=ids)
def test_a_rejected_step_that_overflowed(sensitivity):
    """x' = -p x³ from x0 = 10 with dt0 = 1: the first attempts overflow (stages of ±inf) and
    are rejected. The adjoints and ForwardMode never differentiate a rejected attempt and give
    the exact gradient, x(t) = (x0⁻² + 2pt)^(-1/2), ∂x/∂p = -t x³, ∂x/∂x0 = (x/x0)³, also
    under vmap next to a trajectory that never overflows. Backprop would multiply the attempt's
    zero cotangent by infinite stage derivatives (NaN everywhere, what it returned before): it
    stops with an error that names the alternatives instead."""
    prob = sv.ODEProblem(lambda t, x, p: -p["p"] * x**3, lambda p: p["x0"], 0.0, 1.0)
    p = {"p": jnp.asarray(1.0), "x0": jnp.array([10.0])}
    solve = lambda p: sv.solve(prob, p, dt0=1.0, rtol=1e-10, atol=1e-12, sensitivity=sensitivity)
    assert int(jax.jit(lambda p: solve(p).stats["rejected"])(p)) >= 3
    grad = jax.jit(jax.grad(lambda p: solve(p).ys[-1, 0]))
    x0s = jnp.array([[10.0], [0.5]])
    grad_v = jax.jit(jax.vmap(jax.grad(lambda q, x0: solve({"p": q, "x0": x0}).ys[-1, 0]), (None, 0)))
    if isinstance(sensitivity, sv.Backprop):
        # (under vmap the error reaches Python through XLA's callback, as a JaxRuntimeError)
        for run in (lambda: grad(p), lambda: grad_v(p["p"], x0s)):
            with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError),
                               match="rejected step attempt overflowed.*InterpolatingAdjoint"):
                jax.block_until_ready(run())
        small = {"p": jnp.asarray(1.0), "x0": jnp.array([0.5])}  # no overflow: no error
        x = (1 / 0.25 + 2.0) ** -0.5
        _assert_close({"p": grad(small)["p"]}, {"p": -x**3}, rel=1e-7)
        return
    g = grad(p)
    x = (1 / 100 + 2.0) ** -0.5
    _assert_close({"p": g["p"], "x0": g["x0"][0]}, {"p": -x**3, "x0": (x / 10) ** 3}, rel=1e-7)
    gv = grad_v(p["p"], x0s)
    xs = (1 / x0s[:, 0] ** 2 + 2.0) ** -0.5
    _assert_close(dict(enumerate(gv)), dict(enumerate(-xs**3)), rel=1e-7)


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
    _assert_hvp_matches_differences(L, p, eps=1e-4)


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
