"""What the step control of the derivative (solvers/_directional.py) costs, on the neural DDE
of bench/dde.py (MLP 4-64-64-2, B = 256 as one system, τ = 1, t in [0, 10], rtol 1e-6) and on
its vmapped form (B = 64 trajectories of a 2-state system, parameters shared).

Compares two source trees (this one and a baseline commit checked out elsewhere) in
interleaved rounds of subprocesses: each round times every case once per tree (median of 5
calls of the jitted gradient, compilation excluded), and the ratio of a case is the median
over rounds of new / baseline. Writes bench/results/direction_cost.md.

    .venv/bin/python bench/direction_cost.py BASELINE_TREE [ROUNDS]
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

_CASE = r"""
import json, sys, time, statistics
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
import solvers as sv
from problems import ndde_setup
rhs, params, x_hist = ndde_setup(256)
TS = jnp.linspace(0.5, 10.0, 20)
prob = lambda x: sv.DDEProblem(rhs, lambda t, p: x, lambda p: jnp.asarray([1.0]), 0.0, 10.0)
def loss(sens, x):
    return lambda p: jnp.mean(sv.solve(prob(x), p, saveat=TS, rtol=1e-6, atol=1e-8, sensitivity=sens).ys ** 2)
out = {}
cases = {"Backprop": sv.Backprop(), "InterpolatingAdjoint": sv.InterpolatingAdjoint(),
         "QuadratureAdjoint": sv.QuadratureAdjoint()}
for name, sens in cases.items():
    g = jax.jit(jax.grad(loss(sens, x_hist)))
    jax.block_until_ready(g(params))
    times = []
    for _ in range(5):
        t = time.perf_counter(); jax.block_until_ready(g(params)); times.append(time.perf_counter() - t)
    out[name] = statistics.median(times)
for name in ("InterpolatingAdjoint", "QuadratureAdjoint"):
    sens = cases[name]
    g = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(lambda x: loss(sens, x)(p))(x_hist[:64]))))
    jax.block_until_ready(g(params))
    times = []
    for _ in range(5):
        t = time.perf_counter(); jax.block_until_ready(g(params)); times.append(time.perf_counter() - t)
    out[name + " (vmap, 64)"] = statistics.median(times)
print(json.dumps(out))
"""


def _round(tree: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{HERE}"}
    out = subprocess.run([sys.executable, "-c", _CASE, tree], env=env, capture_output=True, text=True, check=True,
                         cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(baseline: str, rounds: int = 3):
    new, old = [], []
    for _ in range(rounds):
        new.append(_round(str(ROOT)))
        old.append(_round(baseline))
    rows = ["| case | median time, this tree (s) | median time, baseline (s) | ratio (median over rounds) |",
            "|---|---|---|---|"]
    for case in new[0]:
        ratio = statistics.median(n[case] / o[case] for n, o in zip(new, old))
        rows.append(f"| {case} | {statistics.median(n[case] for n in new):.3f} | "
                    f"{statistics.median(o[case] for o in old):.3f} | {ratio:.2f} |")
    text = "\n".join(rows)
    print(text)
    (HERE / "results" / "direction_cost.md").write_text(
        f"Baseline tree: {baseline}; {rounds} interleaved rounds.\n\n{text}\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
