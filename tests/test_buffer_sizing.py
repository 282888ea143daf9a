"""The default history buffer sizes itself outside jit: a problem that needs more stored steps
per delay than the default 256 solves and differentiates at the default settings."""

import jax
import jax.numpy as jnp
import pytest

import solvers as sv

# a forcing of period 2π/40 and a delay of 8: ~800 steps within one delay at rtol 1e-8
PROB = sv.DDEProblem(lambda t, x, lag, p: -p["a"] * lag[0] + jnp.sin(p["w"] * t), lambda t, p: jnp.ones(1),
                     lambda p: jnp.stack([p["tau"]]), 0.0, 10.0)
P = {"a": jnp.asarray(0.5), "w": jnp.asarray(40.0), "tau": jnp.asarray(8.0)}
SAVEAT = jnp.asarray([5.0, 10.0])


def _loss(**kw):
    return lambda p: jnp.sum(sv.solve(PROB, p, saveat=SAVEAT, rtol=1e-8, **kw).ys ** 2)


def test_the_problem_needs_more_than_256_steps_per_delay():
    with pytest.raises(Exception, match="history buffer full: history_size=256"):
        sv.solve(PROB, P, saveat=SAVEAT, rtol=1e-8, history_size=256)
    assert int(sv.solve(PROB, P, saveat=SAVEAT, rtol=1e-8, history_size=2048).stats["steps"]) > 512


def test_default_solve_grows_its_buffer():
    got = sv.solve(PROB, P, saveat=SAVEAT, rtol=1e-8)
    want = sv.solve(PROB, P, saveat=SAVEAT, rtol=1e-8, history_size=1024)
    assert jnp.array_equal(got.ys, want.ys)


@pytest.mark.parametrize("sens", [sv.Backprop(), sv.ForwardMode(), sv.InterpolatingAdjoint(checkpoints=8)],
                         ids=lambda s: type(s).__name__)
def test_default_gradient_grows_its_buffer(sens):
    got = jax.grad(_loss(sensitivity=sens))(P)
    # every buffer as large as max_steps: another lookup program, rounding differently, and the
    # step control turns rounding into step sizes ~1e-9 apart: agreement to O(rtol), not bits
    want = jax.grad(_loss(sensitivity=sens, history_size=4096))(P)
    for k in P:
        assert jnp.allclose(got[k], want[k], rtol=1e-6, atol=0), (k, got[k], want[k])


def test_an_explicit_history_size_is_a_cap_and_jit_keeps_the_default():
    with pytest.raises(Exception, match="history buffer full: history_size=300"):
        sv.solve(PROB, P, saveat=SAVEAT, rtol=1e-8, history_size=300)
    with pytest.raises(Exception, match="history buffer full: history_size=256"):
        jax.jit(lambda p: sv.solve(PROB, p, saveat=SAVEAT, rtol=1e-8).ys)(P)
