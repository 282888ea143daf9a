"""Second order through the solve: Hessian-vector products (forward over each method's reverse
pass), jax.jvp and jax.jacfwd of the solve, against central differences of the gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import (DDE_METHODS, ODE_METHODS, assert_close, assert_hvp_matches_differences, ids, linear_dde,
                     pendulum, refcase_params)


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
    assert_hvp_matches_differences(L, p, eps=1e-5 if obs == "refcase" else 1e-4)


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
    assert_hvp_matches_differences(lambda p: L(p, jnp.linspace(0.25, T, 7)), p, eps=1e-5)
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
        assert_close(jax.jit(jax.jacfwd(lambda p: x_T(p, s)))(p), case["grad_xT"], name=repr(s))
    assert_close(jax.jacfwd(lambda p: x_T(p, sv.InterpolatingAdjoint()))(p), case["grad_xT"], name="eager")

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


def test_forward_mode_under_linearize_and_a_hidden_jvp(refcases):
    """jax.linearize of the solve (optimistix's least squares with jac="fwd" builds on it) and
    jax.jacfwd of a jitted solve reach the sensitivity's own derivative rule. Every method's was
    a custom VJP, which JAX cannot linearize ("can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"); ForwardMode's is now a custom JVP (its Jacobian times the tangents), so
    both work with it. x(T)'s derivatives are refcase A_jump's exact gradient, eager and jitted,
    and the linearization's transpose is that gradient too."""
    case = refcases["A_jump"]
    p = refcase_params(case)
    x_T = lambda p: sv.solve(linear_dde(case["T"]), p, rtol=1e-10, atol=1e-12, sensitivity=sv.ForwardMode()).ys[-1]
    basis = lambda k: {j: jnp.asarray(float(j == k)) for j in p}
    _, lin = jax.linearize(x_T, p)
    assert_close({k: lin(basis(k)) for k in p}, case["grad_xT"], name="linearize")
    jitted = jax.jit(lambda p, v: jax.linearize(x_T, p)[1](v))
    assert_close({k: jitted(p, basis(k)) for k in p}, case["grad_xT"], name="jit(linearize)")
    assert_close(jax.jacfwd(jax.jit(x_T))(p), case["grad_xT"], name="jacfwd(jit)")
    assert_close(jax.linear_transpose(lin, p)(jnp.asarray(1.0))[0], case["grad_xT"], name="linear_transpose")


@pytest.mark.slow
def test_dde_hessian_where_the_solve_cannot_see_jax_jvp(refcases):
    """jax.hessian of a jitted loss and jax.jvp of a jitted gradient trace the solve inside a jit
    with no JVP tracer in sight; an eager jax.jvp of jax.grad traces it inside the program solve
    compiles for itself. In all three the DDE adjoints ran their continuous sweep, and JAX
    differentiated it: silently wrong, d²L/da dτ off by 0.46 on refcase A_jump. The
    sweep is now a custom JVP whose rule is Backprop's reverse pass (as when the forward rule
    sees jax.jvp coming): equal to jax.jit(jax.hessian(L)) with Backprop, for both DDE adjoints
    (one test, so that the reference is compiled once)."""
    case = refcases["A_jump"]
    p, ts = refcase_params(case), jnp.array(case["obs_times"])
    L = lambda p, s: 0.5 * jnp.sum(sv.solve(linear_dde(), p, saveat=ts, rtol=1e-10, atol=1e-12, sensitivity=s).ys ** 2)
    ref = jax.jit(jax.hessian(lambda q: L(q, sv.Backprop())))(p)
    v = {k: jnp.asarray(0.1 * (i + 1)) for i, k in enumerate(p)}
    hv_ref = {k: sum(ref[k][j] * v[j] for j in p) for k in p}
    for sensitivity in (sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()):
        loss = lambda q: L(q, sensitivity)
        hessian = jax.hessian(jax.jit(loss))(p)
        for k in p:
            for j in p:
                assert abs(float(hessian[k][j]) - float(ref[k][j])) < 1e-8 * max(1.0, abs(float(ref[k][j]))), \
                    (repr(sensitivity), k, j)
        for hv in (jax.jvp(jax.jit(jax.grad(loss)), (p,), (v,))[1], jax.jvp(jax.grad(loss), (p,), (v,))[1]):
            for k in p:
                assert abs(float(hv[k]) - float(hv_ref[k])) < 1e-8 * max(1.0, abs(float(hv_ref[k]))), \
                    (repr(sensitivity), k)


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
