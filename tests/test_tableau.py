import math

import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from solvers._tableau import ButcherTableau

SOLVERS = [sv.Euler(), sv.RK4(), sv.Bosh3(), sv.Tsit5(), sv.Dopri5()]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_tableau_is_consistent(solver):
    tab = solver.tableau
    A = tab.a_matrix()
    assert np.allclose(A.sum(axis=1), tab.c, atol=1e-14)
    assert math.isclose(sum(tab.b), 1.0, abs_tol=1e-14)
    dense = np.asarray(tab.dense)
    assert np.allclose(dense.sum(axis=1), tab.b, atol=1e-12)  # interpolant hits y1 at θ=1
    if tab.adaptive:
        assert abs(sum(tab.b_err)) < 1e-14
        assert tab.error_order < tab.order


def test_fsal_and_adaptive_flags():
    assert sv.Tsit5().tableau.fsal and sv.Dopri5().tableau.fsal and sv.Bosh3().tableau.fsal
    assert not sv.RK4().tableau.fsal and not sv.RK4().tableau.adaptive
    assert sv.Tsit5().tableau.adaptive and sv.Bosh3().tableau.adaptive


def test_construction_rejects_a_broken_tableau():
    good = sv.RK4().tableau
    with pytest.raises(ValueError, match=r"row 2 of a sums to"):
        ButcherTableau("bad", good.c, ((0.5,), (0.1, 0.5), (0.0, 0.0, 1.0)), good.b, 4, good.dense)
    with pytest.raises(ValueError, match=r"order condition b.A.c = 1/6"):
        ButcherTableau("bad", (0.0, 0.5, 0.5, 1.0), ((0.5,), (0.5, 0.0), (0.0, 0.0, 1.0)), good.b, 4,
                       good.dense)
    with pytest.raises(ValueError, match=r"dense output at θ=1"):
        ButcherTableau("bad", good.c, good.a, good.b, 4, tuple((1.0, 0.0, 0.0) for _ in range(4)))
    with pytest.raises(ValueError, match=r"a needs 3 rows"):
        ButcherTableau("bad", good.c, good.a[:2], good.b, 4, good.dense)


def _exact(t):  # x' = -x + sin t, x(0) = 1
    return 1.5 * math.exp(-t) + 0.5 * (math.sin(t) - math.cos(t))


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_observed_convergence_order(solver):
    prob = sv.ODEProblem(lambda t, x, p: -x + jnp.sin(t), jnp.array([1.0]), 0.0, 2.0)
    errors = []
    for n in (40, 80, 160):
        sol = sv.solve(prob, None, solver=solver, dt0=2.0 / n, controller=sv.ConstantStepSize())
        assert int(sol.stats["steps"]) == n
        errors.append(abs(float(sol.ys[-1, 0]) - _exact(2.0)))
    observed = math.log2(errors[1] / errors[2])
    order = solver.tableau.order
    assert order - 0.3 <= observed <= order + 1.2, (errors, observed)


@pytest.mark.parametrize("solver", [sv.Bosh3(), sv.Tsit5(), sv.Dopri5(), sv.RK4()], ids=lambda s: s.name)
def test_dense_output_converges(solver):
    """Dense output drives every delayed lookup: its error at mid-step must fall with h."""
    from solvers._step import rk_step
    from solvers._history import horner

    f = lambda t, y: -y + jnp.sin(t)
    errs = []
    for h in (0.2, 0.1):
        step = rk_step(solver.tableau, lambda t, y, _left: f(t, y), 0.0, jnp.array([1.0]), h, f(0.0, jnp.array([1.0])))
        errs.append(abs(float(horner(step.coeffs, 0.37)[0]) - _exact(0.37 * h)))
    degree = solver.tableau.degree
    assert math.log2(errs[0] / errs[1]) >= degree + 1 - 0.5, errs


def test_rk_step_with_an_integral_tail_equals_the_full_step():
    """n_state: the tail (an adjoint's ∫ f_pᵀλ) is advanced with the weights b only and left
    out of the stages, error and dense output; the result is the same step."""
    from solvers._step import rk_step

    tab = sv.Tsit5().tableau

    def f(t, z):  # reads the state z[:2] only; the last three entries are integrals
        x = z[:2]
        return jnp.concatenate([jnp.stack([x[1], -jnp.sin(x[0])]), jnp.stack([x[0] ** 2, t * x[1], jnp.cos(x[0])])])

    z = jnp.array([0.3, 0.1, 1.0, 2.0, 3.0])
    stage = lambda t, z, _left: f(t, z)
    full = rk_step(tab, stage, 0.0, z, 0.2, f(0.0, z))
    part = rk_step(tab, stage, 0.0, z, 0.2, f(0.0, z), n_state=2)
    np.testing.assert_allclose(part.y1, full.y1, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(part.err, full.err, rtol=1e-14, atol=1e-18)  # the integral's error too
    np.testing.assert_allclose(part.coeffs, full.coeffs[:, :2], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(part.k_last, full.k_last, rtol=1e-14)
    # n_dense: the dense output also covers the first integral (a DDE adjoint's ∫μ)
    dense = rk_step(tab, stage, 0.0, z, 0.2, f(0.0, z), n_state=2, n_dense=3)
    np.testing.assert_allclose(dense.y1, full.y1, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dense.coeffs, full.coeffs[:, :3], rtol=1e-14, atol=1e-15)
