"""How often tracing a Backprop gradient walks the solver's step (trace time, not run time)."""

import jax
import jax.numpy as jnp
import pytest

import solvers as sv
from helpers import linear_dde, pendulum


def _count(monkeypatch, module, *names):
    """Count calls of module.<name> for each name (until monkeypatch undoes it)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _orig=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _orig(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["dde with a learned delay", "ode with checkpoints", "ode"])
def test_backprop_linearizes_the_loop_body_once_per_fixed_point(monkeypatch, kind):
    """Equinox's checkpointed loop learns which carries a derivative reaches by re-linearizing the
    loop body until nothing changes (in its forward rule and again in its backward rule), and
    which cotangents stay zero by repeated vjps of it. The loop is handed a state that already
    carries the answer (``_forward._perturbed_as_in_the_loop``): one linearization per fixed
    point, and one vjp besides the backward step's own. Without it this DDE took 6
    linearizations and 3 vjps (the ODE 4 and 3): trace 5.7 s instead of 2.7 s. An ODE without
    checkpoints runs _reverse_loop instead: its reverse pass traces one vjp of the step, no
    linearization."""
    if kind.startswith("ode"):
        prob, p = pendulum(), {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "q0": jnp.asarray(1.0)}
    else:
        prob = linear_dde()
        p = {k: jnp.asarray(v) for k, v in {"a": -0.5, "b": -1.0, "tau": 0.8, "c": 0.7, "x0": 1.0}.items()}
    ts = jnp.array([0.5, 1.7, 3.5])
    sensitivity = sv.Backprop(checkpoints=16 if kind == "ode with checkpoints" else None)
    loss = lambda p: jnp.sum(sv.solve(prob, p, saveat=ts, sensitivity=sensitivity).ys ** 2)
    calls = _count(monkeypatch, jax, "linearize", "vjp")
    jax.jit(jax.grad(loss)).trace(p)
    if kind == "ode":
        assert calls == {"linearize": 0, "vjp": 1}, calls
        return
    # at least one of each: the count still sees equinox's calls (else the bounds would pass vacuously)
    assert 1 <= calls["linearize"] <= 2 and 1 <= calls["vjp"] <= 2, calls


def test_a_dde_step_reads_its_history_once_for_all_its_stages(monkeypatch):
    """The delayed values of a step's later stages depend on the stage times only (steps are capped
    at the smallest delay), so they are read in one batched lookup (``Rhs.lookups``): a traced
    solve holds as many copies of the lookup code with Tsit5 (7 stages) as with Bosh3 (4). Read
    stage by stage they were 9 and 6 copies, and compiling them was 15-30% of a DDE gradient's
    compile time."""
    import solvers._history as history

    p = {k: jnp.asarray(v) for k, v in {"a": -0.5, "b": -1.0, "tau": 0.8, "c": 0.7, "x0": 1.0}.items()}
    counts = {}
    for solver in (sv.Tsit5(), sv.Bosh3()):
        calls = _count(monkeypatch, history, "lookup")
        loss = lambda p: jnp.sum(sv.solve(linear_dde(), p, saveat=jnp.array([1.7, 3.5]), solver=solver).ys ** 2)
        jax.jit(loss).trace(p)
        counts[solver.tableau.name] = calls["lookup"]
        monkeypatch.undo()
    assert counts["Tsit5"] == counts["Bosh3"] and 1 <= counts["Tsit5"] < 7, counts


def test_each_adjoint_traces_its_loop_bodies_once(monkeypatch):
    """The sweep's step is most of an adjoint gradient's program, and XLA compiles every copy.
    InterpolatingAdjoint swept the segments its final buffer holds in a call of its own and the
    re-solved ones in a loop (two sweeps), and its checkpointed forward ran the last segment
    outside the scan over the others: 5 solver loops where 3 do (forward, re-solve, sweep); its
    DDE gradient compiled in 5.7 s instead of 4.1 s (bench/README.md). QuadratureAdjoint took one
    VJP per Gauss node, so its trace grew with the node count; the nodes are one batched VJP."""
    import solvers._forward as forward

    p = {k: jnp.asarray(v) for k, v in {"a": -0.5, "b": -1.0, "tau": 0.8, "c": 0.7, "x0": 1.0}.items()}

    def traced(sensitivity, prob=linear_dde()):
        loss = lambda p: jnp.sum(sv.solve(prob, p, saveat=jnp.array([1.7, 3.5]), sensitivity=sensitivity).ys ** 2)
        runs, vjps = _count(monkeypatch, forward, "run"), _count(monkeypatch, jax, "vjp")
        jax.jit(jax.grad(loss)).trace(p)
        monkeypatch.undo()
        return {**runs, **vjps}

    ode = sv.ODEProblem(lambda t, x, p: p["a"] * x, lambda p: p["x0"] * jnp.ones(2), 0.0, 3.5)
    assert traced(sv.InterpolatingAdjoint())["run"] == 3 and traced(sv.InterpolatingAdjoint(), ode)["run"] == 3
    vjps = [traced(sv.QuadratureAdjoint(nodes=k))["vjp"] for k in (2, 4)]
    assert vjps[0] == vjps[1] >= 2, vjps
