"""Trace + lowering and XLA compile time of gradient programs (the cost a user pays once per
program, and nearly all of `make test`'s time), and the time of eager calls (a gradient or
Hessian-vector product called outside jit, first at p, then at a new p). Each program is built
in a fresh process, so nothing is cached; medians over --repeats processes. Writes
bench/results/compile.md.

    .venv/bin/python bench/compile.py [--repeats 3]
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
PROGRAMS = ["dde-Backprop-grad", "dde-InterpolatingAdjoint-grad", "dde-QuadratureAdjoint-grad",
            "dde-ForwardMode-grad", "dde-Backprop-hvp", "ode-InterpolatingAdjoint-grad"]
EAGER = ["dde-InterpolatingAdjoint-eagergrad", "dde-Backprop-eagerhvp", "ode-Backprop-eagerhvp",
         "ode-InterpolatingAdjoint-eagerhvp"]


def measure(name):
    """One program, in this process: (trace + lower seconds, compile seconds, run ms)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(HERE.parent))
    import solvers as sv

    kind, method, mode = name.split("-")
    sens = getattr(sv, method)()
    if kind == "dde":  # refcase A_jump: x' = a x + b x(t - τ), history c, x(0) = x0
        rhs = lambda t, x, lag, p: p["a"] * x + p["b"] * lag[0]
        prob = sv.DDEProblem(rhs, lambda t, p: p["c"] * jnp.ones_like(t), lambda p: jnp.stack([p["tau"]]), 0.0, 3.5,
                             x0=lambda p: p["x0"])
        p = {k: jnp.asarray(v) for k, v in {"a": -0.5, "b": -1.0, "tau": 1.0, "c": 0.7, "x0": 1.0}.items()}
        ts = jnp.array([0.5, 1.2, 1.7, 2.5, 3.5])
    else:  # the pendulum as a GradientField
        H = lambda x, p: x[1] ** 2 / (2 * p["m"]) + p["k"] * (1 - jnp.cos(x[0]))
        prob = sv.ODEProblem(sv.GradientField(H, sv.canonical_hamiltonian_j(2)),
                             lambda p: jnp.stack([p["q0"], jnp.zeros_like(p["q0"])]), 0.0, 10.0)
        p = {k: jnp.asarray(v) for k, v in {"m": 1.0, "k": 2.0, "q0": 1.0}.items()}
        ts = jnp.array([5.0, 10.0])
    L = lambda p: jnp.sum(sv.solve(prob, p, saveat=ts, rtol=1e-10, atol=1e-12, sensitivity=sens).ys ** 2)
    v = jax.tree_util.tree_map(lambda a: 0.1 * jnp.ones_like(a), p)
    fn = jax.grad(L) if mode.endswith("grad") else (lambda p: jax.jvp(jax.grad(L), (p,), (v,))[1])
    if mode.startswith("eager"):  # (first call, second call at a new p) in seconds
        t0 = time.perf_counter()
        jax.block_until_ready(fn(p))
        t1 = time.perf_counter()
        jax.block_until_ready(fn(jax.tree_util.tree_map(lambda a: 1.01 * a, p)))
        return t1 - t0, time.perf_counter() - t1
    t0 = time.perf_counter()
    lowered = jax.jit(fn).trace(p).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(p))
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(compiled(p))
        runs.append(time.perf_counter() - t)
    return t1 - t0, t2 - t1, 1e3 * statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-only", action="store_true", help="only the eager calls (results/compile-eager.md)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    sys.path.insert(0, str(HERE))
    from timing import versions

    def medians(name):
        res = [json.loads(subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
        row = f"| {name} | " + " | ".join(f"{statistics.median(r[i] for r in res):.2f}" for i in range(len(res[0])))
        print(row + " |", flush=True)
        return row + " |"

    table = [] if args.eager_only else ["| program (float64) | trace + lower (s) | XLA compile (s) | run (ms) |",
                                        "|---|---|---|---|", *map(medians, PROGRAMS), ""]
    table += ["| eager call (float64, outside jit) | first call (s) | at a new p (s) |", "|---|---|---|",
              *map(medians, EAGER)]
    info = ", ".join(f"{k} {v}" for k, v in versions().items())
    out = "\n".join([f"# Compile time (medians of {args.repeats} fresh processes)", "", info, "", *table, ""])
    (HERE / "results" / ("compile-eager.md" if args.eager_only else "compile.md")).write_text(out)
    print(out)


if __name__ == "__main__":
    main()
