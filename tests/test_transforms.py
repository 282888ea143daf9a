"""jit and vmap give the same results as a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers as sv
from helpers import linear_dde, pendulum

OBS = jnp.array([0.5, 1.2, 1.7, 2.5, 3.5])


def _dde_ys(p):
    return sv.solve(linear_dde(), p, saveat=OBS, rtol=1e-8, atol=1e-10).ys


def test_vmap_and_jit_over_delay_history_and_x0_match_a_loop():
    batch = {"a": jnp.full(4, -0.5), "b": jnp.full(4, -1.0), "tau": jnp.array([0.6, 0.9, 1.0, 1.3]),
             "c": jnp.array([0.7, 1.0, 0.2, -0.3]), "x0": jnp.array([1.0, 1.0, 0.5, 2.0])}
    batched = jax.jit(jax.vmap(_dde_ys))(batch)
    loop = jnp.stack([_dde_ys(jax.tree_util.tree_map(lambda v: v[i], batch)) for i in range(4)])
    np.testing.assert_allclose(batched, loop, rtol=0, atol=1e-12)


def test_vmap_ode_over_parameters_matches_loop():
    q0s = jnp.array([0.3, 1.0, 2.0])
    solve = lambda q0: sv.solve(pendulum(), {"m": 1.0, "k": 2.0, "q0": q0}, rtol=1e-8).ys[-1]
    batched = jax.vmap(jax.jit(solve))(q0s)
    loop = jnp.stack([solve(q) for q in q0s])
    np.testing.assert_allclose(batched, loop, rtol=0, atol=1e-12)


def test_stats_are_per_trajectory_under_vmap():
    stats = jax.vmap(lambda tau: sv.solve(linear_dde(), {"a": -0.5, "b": -1.0, "tau": tau, "c": 0.7,
                                                          "x0": 1.0}, rtol=1e-8).stats)(jnp.array([0.5, 1.5]))
    assert stats["steps"].shape == (2,)
    assert int(stats["steps"][0]) != int(stats["steps"][1])


def _products(jaxpr):
    """Every dot_general equation in ``jaxpr`` and its sub-jaxprs (loop bodies, branches, calls)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _products(sub)
    return found


def _products_with_batched(jaxpr, shape):
    """dot_general equations with an operand of ``shape``."""
    return [eqn for eqn in _products(jaxpr) if any(tuple(v.aval.shape) == shape for v in eqn.invars)]


_METHODS = [sv.Backprop(), sv.ForwardMode(), sv.BacksolveAdjoint(), sv.InterpolatingAdjoint(), sv.QuadratureAdjoint()]


@pytest.mark.parametrize("kind,sens", [(k, s) for k in ("ode", "dde") for s in _METHODS if k == "ode" or s.supports_dde],
                         ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_vmap_never_copies_the_weights_per_trajectory(kind, sens):
    """Under vmap over trajectories, a lax.cond on a per-trajectory predicate whose branch closes
    over the parameters broadcasts them to the batch (JAX's batched cond selects on its operands):
    each trajectory then multiplied by its own copy of every weight matrix (a third of the vmapped
    HNN adjoints' time). No product in the gradient's program may take a (batch, *W2.shape) operand."""
    B, key = 3, jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    p = {"W1": 0.3 * jax.random.normal(k1, (2, 7)), "W2": 0.3 * jax.random.normal(k2, (7, 11)),
         "w3": 0.3 * jax.random.normal(k3, (11,)), "tau": jnp.asarray(0.7)}
    H = lambda x, p: jnp.tanh(jnp.tanh(x @ p["W1"]) @ p["W2"]) @ p["w3"]
    J = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
    x0s = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, -1.0]])
    if kind == "ode":
        one = lambda p, x0: sv.solve(sv.ODEProblem(lambda t, x, p: J @ jax.grad(H)(x, p), x0, 0.0, 2.0), p,
                                     saveat=jnp.array([1.0, 2.0]), sensitivity=sens).ys
    else:
        f = lambda t, x, lagged, p: J @ jax.grad(H)(x, p) - 0.5 * lagged[0]
        history, delays = (lambda t, p: p["W1"][:, 0]), (lambda p: p["tau"][None])
        one = lambda p, x0: sv.solve(sv.DDEProblem(f, history, delays, 0.0, 2.0, x0=x0), p,
                                     saveat=jnp.array([1.0, 2.0]), sensitivity=sens).ys
    loss = lambda p: jnp.sum(jax.vmap(one, (None, 0))(p, x0s) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(p).jaxpr  # traced, not compiled: the vmapped gradients'
    # values are checked against loops in test_sensitivities and below
    assert not _products_with_batched(jaxpr, (B, 7, 11)), "W2 multiplies each trajectory as its own copy"


_SAVE = jnp.array([0.5, 1.5, 3.0])


def _closing_over(kind, c):
    """A problem whose functions capture c itself (a tracer under vmap or grad), not through p or x0=."""
    x0 = lambda p: c * jnp.array([1.0, -0.5])
    if kind == "ode":
        return sv.ODEProblem(lambda t, x, p: -p["a"] * x + c * jnp.sin(x), x0, 0.0, 3.0)
    if kind == "gradient_field":
        H = lambda x, p: 0.5 * p["a"] * x[0] ** 2 + 0.5 * c * jnp.cos(x[1])
        field = sv.GradientField(H, sv.canonical_hamiltonian_j(2), extra=lambda t, x, p: -0.1 * c * x)
        return sv.ODEProblem(field, x0, 0.0, 3.0)
    return sv.DDEProblem(lambda t, x, lagged, p: -p["a"] * x + c * lagged[0], lambda t, p: x0(p),
                         lambda p: (1.0 + 0.1 * c)[None], 0.0, 3.0)


# ForwardMode and the adjoints share the conversion (sensitivity/_closure.py); each problem kind
# and each rule (ForwardMode's, the adjoints' with their vmapped fold) is covered
_CLOSURE_CASES = [("ode", sv.BacksolveAdjoint()), ("ode", sv.InterpolatingAdjoint()), ("dde", sv.ForwardMode()),
                  ("dde", sv.InterpolatingAdjoint()), ("dde", sv.QuadratureAdjoint()),
                  ("gradient_field", sv.InterpolatingAdjoint())]


@pytest.mark.parametrize("kind,sens", _CLOSURE_CASES,
                         ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_functions_closing_over_a_vmapped_value_are_differentiated(kind, sens):
    """A per-trajectory value captured by the problem's functions (rhs or GradientField's H and
    extra, x0, history, delays) reaches ForwardMode's and the adjoints' rules as an explicit
    input: before, they leaked the vmap tracer (UnexpectedTracerError; Backprop, the reference
    below, differentiates the closure directly). Gradients with respect to p and to the captured
    c, under jit(vmap), against central differences per trajectory."""
    p, cs = {"a": jnp.asarray(0.7)}, jnp.array([0.6, 0.8, 1.1])

    def loss(p, c, sens=sens):
        sol = sv.solve(_closing_over(kind, c), p, saveat=_SAVE, sensitivity=sens, rtol=1e-10, atol=1e-10)
        return jnp.sum(sol.ys**2)

    grad_a, grad_c = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), (None, 0)))(p, cs)
    eps, value = 1e-6, jax.jit(jax.vmap(lambda a, c: loss({"a": a}, c, sv.Backprop()), (None, 0)))
    fd_a = (value(p["a"] + eps, cs) - value(p["a"] - eps, cs)) / (2 * eps)
    fd_c = (value(p["a"], cs + eps) - value(p["a"], cs - eps)) / (2 * eps)
    np.testing.assert_allclose(grad_a["a"], fd_a, rtol=1e-5)
    np.testing.assert_allclose(grad_c, fd_c, rtol=1e-5)


@pytest.mark.parametrize("kind,sens", [(k, s) for k in ("ode", "gradient_field", "dde") for s in _METHODS
                                       if k != "dde" or s.supports_dde],
                         ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_every_product_of_a_float32_gradient_runs_at_highest_precision(kind, sens):
    """JAX's default float32 product on GPUs keeps ~3 digits (TF32), which breaks float32 error
    control (DESIGN.md). Every matrix product in a float32 gradient's program, the problem's own
    (forward, backward sweeps, recomputed steps, their transposes) and the solver's, carries
    precision HIGHEST; with matmul_precision=None the problem's keep JAX's default. Checked in the
    traced program (CPUs ignore the setting, so the values cannot show it here)."""
    W = jnp.array([[0.3, -0.2, 0.1], [0.2, 0.4, -0.3]], jnp.float32)
    p = {"W": W, "tau": jnp.asarray(0.7, jnp.float32)}
    x0 = jnp.array([1.0, -0.5], jnp.float32)
    H = lambda x, p: jnp.sum(jnp.tanh(x @ p["W"]))
    if kind == "ode":
        prob = sv.ODEProblem(lambda t, x, p: jnp.tanh(x @ p["W"]) @ p["W"].T, x0, 0.0, 2.0)
    elif kind == "gradient_field":
        prob = sv.ODEProblem(sv.GradientField(H, sv.canonical_hamiltonian_j(2), extra=lambda t, x, p: -0.1 * x @ p["W"]
                                              @ p["W"].T), x0, 0.0, 2.0)
    else:
        prob = sv.DDEProblem(lambda t, x, lagged, p: jnp.tanh(lagged[0] @ p["W"]) @ p["W"].T - 0.5 * x,
                             lambda t, p: (x0 @ p["W"]) @ p["W"].T, lambda p: p["tau"][None], 0.0, 2.0, x0=x0)
    saveat = jnp.array([1.0, 2.0], jnp.float32)

    def products(precision):
        loss = lambda p: jnp.sum(sv.solve(prob, p, saveat=saveat, sensitivity=sens, rtol=1e-4, atol=1e-6,
                                          matmul_precision=precision).ys ** 2)
        return _products(jax.make_jaxpr(jax.grad(loss))(p).jaxpr)

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    found = products("highest")
    assert found and all(eqn.params["precision"] == highest for eqn in found), \
        [eqn.params["precision"] for eqn in found if eqn.params["precision"] != highest]
    assert any(eqn.params["precision"] != highest for eqn in products(None))


_SHARDED = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"  # + conftest's
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
sys.path.insert(0, sys.argv[1])
import solvers as sv
from helpers import linear_dde

p = {"a": -0.5, "b": -1.0, "tau": 1.0, "c": 0.7}
x0s = jnp.array([1.0, 0.5, -0.3, 2.0])
sharded = jax.device_put(x0s, NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec("batch")))
out = {"devices": len(sharded.sharding.device_set)}
for throw in (True, False):
    def loss(p, x0):
        return sv.solve(linear_dde(), dict(p, x0=x0), saveat=jnp.array([1.0, 3.5]), rtol=1e-8, atol=1e-10,
                        max_steps=4096 if throw else 20, throw=throw).ys[-1] ** 2
    grad = jax.jit(jax.grad(lambda p, xs: jnp.mean(jax.vmap(loss, (None, 0))(p, xs))))
    out[str(throw)] = [[float(grad(p, xs)[k]) for k in sorted(p)] for xs in ((sharded, x0s) if throw else (sharded,))]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_batch_sharded_over_two_devices_gives_the_unsharded_gradient():
    """jax.jit of the mean of a vmapped loss whose batch is sharded over two devices
    (jax.sharding; two host devices by XLA_FLAGS, which must be set before JAX starts, so in a
    subprocess): the gradient of the default method equals the unsharded one. With throw=False a
    solve that runs out of steps makes it NaN; with throw=True an error raised on one device
    would leave the other waiting at the mean's all-reduce until XLA aborts (README)."""
    import json
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).parent
    run = subprocess.run([sys.executable, "-c", _SHARDED, str(here)], capture_output=True, text=True, timeout=600,
                         cwd=here.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    sharded, single = out["True"]
    np.testing.assert_allclose(sharded, single, rtol=1e-14, atol=0)
    assert all(abs(g) > 1e-3 for g in single)
    assert all(np.isnan(g) for g in out["False"][0])
