"""Error of each gradient method at rtol 1e-6 and 1e-10 (atol = rtol / 100) on the issue-37
reproducers and the public refcases: the largest error over the gradient's entries, relative
to its largest entry, against the exact gradient (refcases; reproducer 1 by the method of
steps on polynomials) or ForwardMode on fixed steps of τ/40 (reproducer 2).

    python bench/adjoint_convergence.py   # prints a markdown table
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tests"))

import solvers as sv  # noqa: E402
from helpers import linear_dde, pendulum, refcase_params  # noqa: E402
from test_adjoint_convergence import _exact_dL_db_reproducer_1, _reproducer_1, _reproducer_2  # noqa: E402

CASES = pathlib.Path(__file__).parent.parent.parent / "shared" / "refcases" / "cases.json"
if not CASES.exists():
    CASES = pathlib.Path(__file__).parent.parent / "tests" / "data" / "cases.json"


def rel(g, ref):
    keys = sorted(ref)
    g, r = np.array([float(g[k]) for k in keys]), np.array([float(ref[k]) for k in keys])
    return np.max(np.abs(g - r)) / np.max(np.abs(r))


def problems():
    cases = json.loads(CASES.read_text())
    grad1 = _reproducer_1(0.0)
    yield "reproducer 1 (dL/db)", (lambda s, r: {"b": grad1(s, rtol=r, atol=r / 100)["b"]}), \
        {"b": _exact_dL_db_reproducer_1()}
    _, p2, loss2 = _reproducer_2()
    ref2 = jax.grad(loss2(sv.ForwardMode(), controller=sv.ConstantStepSize(), dt0=0.7 / 40, max_steps=20000))(p2)
    yield "reproducer 2", (lambda s, r: jax.grad(loss2(s, rtol=r, atol=r / 100))(p2)), ref2
    for name in ("A_jump", "A_cont"):
        case = cases[name]
        prob, p = linear_dde(case["T"]), refcase_params(case)
        obs = jnp.asarray(case["obs_times"])
        loss = lambda s, r, prob=prob, obs=obs: lambda p: jnp.sum(
            sv.solve(prob, p, saveat=obs, sensitivity=s, rtol=r, atol=r / 100).ys ** 2) / 2
        yield f"{name} (L)", (lambda s, r, p=p, loss=loss: jax.grad(loss(s, r))(p)), case["grad_L"]
    case = cases["E"]
    prob = pendulum()
    p = {"m": jnp.asarray(1.0), "k": jnp.asarray(2.0), "q0": jnp.asarray(1.0)}
    loss = lambda s, r: lambda p: jnp.sum(sv.solve(prob, p, sensitivity=s, rtol=r, atol=r / 100).ys ** 2)
    yield "E (pendulum)", (lambda s, r: jax.grad(loss(s, r))(p)), case["grad_L"]


def main():
    print("| problem | method | error at rtol 1e-6 | at 1e-10 | fall |")
    print("|---|---|---|---|---|")
    for name, grad, ref in problems():
        for sens in (sv.InterpolatingAdjoint(), sv.QuadratureAdjoint(), sv.Backprop(), sv.ForwardMode()):
            e6, e10 = (rel(grad(sens, r), ref) for r in (1e-6, 1e-10))
            print(f"| {name} | {type(sens).__name__} | {e6:.2e} | {e10:.2e} | {e6 / e10:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
