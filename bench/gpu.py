"""GPU comparison (one card): float32 with matmul precision "highest" (TF32 breaks float32
error control). Writes bench/results/gpu-<card>.md. Run through bench/gpu.sh."""

from __future__ import annotations

import pathlib
import sys
import time

import jax

jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import solvers as sv  # noqa: E402
from problems import hnn_setup, ndde_setup, rk4_method_of_steps  # noqa: E402
from timing import median_time, versions  # noqa: E402


def hnn(B, rows):
    import diffrax

    H, J, rhs, params, x0 = hnn_setup(B, dtype=jnp.float32)
    ts = jnp.linspace(0.0, 10.0, 50, dtype=jnp.float32)
    prob = sv.ODEProblem(rhs, x0, 0.0, 10.0)
    kw = dict(saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False)
    loss = lambda ys: jnp.mean(ys**2)
    dfx = lambda p, adj=diffrax.RecursiveCheckpointAdjoint(): diffrax.diffeqsolve(
        diffrax.ODETerm(rhs), diffrax.Tsit5(), 0.0, 10.0, None, x0, args=p, saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), max_steps=4096, adjoint=adj)
    cases = [("ndde forward", jax.jit(lambda p: sv.solve(prob, p, **kw).ys)),
             ("diffrax forward", jax.jit(lambda p: dfx(p).ys)),
             ("ndde Backprop grad", jax.jit(jax.grad(lambda p: loss(sv.solve(prob, p, sensitivity=sv.Backprop(), **kw).ys)))),
             ("ndde InterpolatingAdjoint grad", jax.jit(jax.grad(lambda p: loss(sv.solve(prob, p, **kw).ys)))),
             ("diffrax RecursiveCheckpointAdjoint grad", jax.jit(jax.grad(lambda p: loss(dfx(p).ys))))]
    for name, fn in cases:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        compile_s = time.perf_counter() - t0
        rows.append((f"HNN B={B}: {name}", median_time(fn, params, repeats=5), compile_s))


def dde(B, rows):
    rhs, params, x_hist = ndde_setup(B, dtype=jnp.float32)
    prob = sv.DDEProblem(rhs, lambda t, p: x_hist, lambda p: jnp.array([1.0], jnp.float32), 0.0, 10.0)
    loss = lambda ys: jnp.mean(ys**2)
    scan = lambda p: rk4_method_of_steps(rhs, p, x_hist, 1.0, 10.0, 32)[-1]
    cases = [("ndde forward", jax.jit(lambda p: sv.solve(prob, p, rtol=1e-5, atol=1e-7).ys)),
             ("RK4 scan 32/tau forward", jax.jit(scan)),
             ("ndde InterpolatingAdjoint grad",
              jax.jit(jax.grad(lambda p: loss(sv.solve(prob, p, rtol=1e-5, atol=1e-7).ys)))),
             ("RK4 scan grad", jax.jit(jax.grad(lambda p: loss(scan(p)))))]
    for name, fn in cases:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        compile_s = time.perf_counter() - t0
        rows.append((f"DDE B={B}: {name}", median_time(fn, params, repeats=5), compile_s))


def main():
    card = jax.devices()[0].device_kind
    rows = []
    for job in (lambda: hnn(65536, rows), lambda: dde(65536, rows)):
        try:
            job()
        except Exception as e:  # record and go on: one failing comparison must not lose the others
            rows.append((f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", float("nan"), 0.0))
        print("\n".join(f"{n}: {t * 1e3:.1f} ms (compile {c:.0f} s)" for n, t, c in rows), flush=True)
    text = [f"# GPU results: {card}", "", "float32, jax_default_matmul_precision=highest; medians of 5 runs.", "",
            "| case | median (ms) | compile (s) |", "|---|---|---|"]
    text += [f"| {n} | {t * 1e3:.1f} | {c:.0f} |" for n, t, c in rows]
    text += ["", ", ".join(f"{k} {v}" for k, v in versions().items())]
    out = HERE / "results" / f"gpu-{card.replace(' ', '_')}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    if "OUT" in __import__("os").environ:
        import shutil

        shutil.copy(out, pathlib.Path(__import__("os").environ["OUT"]) / out.name)


if __name__ == "__main__":
    main()
