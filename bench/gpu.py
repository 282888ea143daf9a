"""GPU comparison (one card): float32 with matmul precision "highest" (TF32 breaks float32
error control). Run through bench/gpu.sh; writes bench/results/gpu-<card>.md (rewritten after
every case, and copied to $OUT when set, so a run cut short still reports what it measured).

1. Ceilings measured on the card: a float32 8192³ matmul at "highest" precision and a
   device-to-device copy (bytes read + written).
2. HNN (bench/problems.py) as one batched system, B = 256, 4096 and 65536: ndde's forward and
   gradients next to diffrax (Tsit5, PID controller, RecursiveCheckpointAdjoint), all timed in
   the same rounds (ratios are medians of back-to-back pairs). FLOP/s counts useful work only:
   the forward's rhs evaluations × (FLOP of one rhs [+ FLOP of one rhs VJP for a gradient]),
   each from XLA's cost analysis of the loop-free function.
3. Neural DDE (MLP 4-64-64-2, τ = 1), B = 65536: ndde (rtol 1e-5) vs the RK4 method-of-steps
   scan at 32 steps per τ.
Environment: GPU_BENCH_HNN_SIZES (default "256,4096,65536"), GPU_BENCH_DDE_SIZE (65536; 0 skips),
GPU_BENCH_ROUNDS (7), GPU_BENCH_TAG (appended to the file name), GPU_BENCH_MATMUL (8192: the ceiling matmul's size; the copy moves 16 n² bytes each way).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import sys
import time

import jax

jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import solvers as sv  # noqa: E402
from problems import diffrax_solve, hnn_setup, mlp, ndde_setup, rk4_method_of_steps  # noqa: E402
from timing import interleaved_times, paired_ratio, versions  # noqa: E402

ROUNDS = int(os.environ.get("GPU_BENCH_ROUNDS", "7"))
CARD = jax.devices()[0].device_kind
OUT = HERE / "results" / f"gpu-{CARD.replace(' ', '_')}{os.environ.get('GPU_BENCH_TAG', '')}.md"
LINES: list[str] = []


def emit(line=""):
    print(line, flush=True)
    LINES.append(line)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(LINES + ["", ", ".join(f"{k} {v}" for k, v in versions().items())]) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(OUT, pathlib.Path(os.environ["OUT"]) / OUT.name)


def _flops(fn, *args):
    """FLOP of the lowered (unoptimized) HLO: the same count on every backend. The GPU compiled
    program's own cost analysis counts about half of the cuBLAS matmul FLOP (seen on an H200)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if cost is None:  # GPU backends give none for the lowered HLO: count it on the CPU backend
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            cost = jax.jit(fn).lower(*jax.device_put(args, cpu)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def _rel(a, b):
    fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.max(jnp.abs(fa - fb)) / jnp.max(jnp.abs(fb)))


def _compiled(fns, params):
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            jax.block_until_ready(fn(params))
            out[name] = (fn, time.perf_counter() - t0)
        except Exception as e:  # one failing case must not lose the others
            emit(f"| {name} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | | | |")
    return out


def _section(title, columns, fns, params):
    """Emit a section's title and table header, compile every case, time them in shared rounds."""
    for line in ("", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)):
        emit(line)
    ok = _compiled(fns, params)
    return ok, interleaved_times({n: f for n, (f, _) in ok.items()}, params, rounds=ROUNDS)


def ceilings():
    n = int(os.environ.get("GPU_BENCH_MATMUL", "8192"))
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    x = jax.random.normal(jax.random.PRNGKey(2), (4 * n * n,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.5)
    t = interleaved_times({"mm": lambda _: mm(a, b), "cp": lambda _: cp(x)}, None, rounds=ROUNDS)
    peak = 2 * n**3 / statistics.median(t["mm"])
    bw = 2 * x.nbytes / statistics.median(t["cp"])
    emit(f"Measured ceilings: float32 {n}³ matmul (precision highest) {peak / 1e12:.1f} TFLOP/s; "
         f"device copy {bw / 1e12:.2f} TB/s (read + write). Datasheet float32 (non-tensor) peak: 67 TFLOP/s.")
    return peak


def hnn(B, peak):
    import diffrax

    H, J, rhs, params, x0 = hnn_setup(B, dtype=jnp.float32)
    ts = jnp.linspace(0.0, 10.0, 50, dtype=jnp.float32)
    prob = sv.ODEProblem(rhs, x0, 0.0, 10.0)
    kw = dict(saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False)
    loss = lambda ys: jnp.mean(ys**2)

    def dfx(p, adjoint=diffrax.RecursiveCheckpointAdjoint()):
        return diffrax_solve(rhs, x0, ts, p, adjoint)

    ndde_grad = lambda field, sens, **extra: jax.jit(jax.grad(lambda p: loss(sv.solve(
        sv.ODEProblem(field, x0, 0.0, 10.0), p, sensitivity=sens, **kw, **extra).ys)))
    i_ctrl = sv.PIController(beta_scale=0.0)  # the I controller: diffrax's PIDController default form
    gf = lambda vjp: sv.GradientField(lambda x, p: jnp.sum(mlp(p, x)), J, adjoint_vjp=vjp)
    ref = "diffrax RecursiveCheckpointAdjoint grad"
    fns = {"ndde forward": jax.jit(lambda p: sv.solve(prob, p, **kw).ys),
           "diffrax forward": jax.jit(lambda p: dfx(p).ys),
           "ndde Backprop grad": ndde_grad(rhs, sv.Backprop()),
           "ndde Backprop(checkpoints=128) grad": ndde_grad(rhs, sv.Backprop(checkpoints=128)),
           "ndde Backprop, I controller (diffrax's form) grad": ndde_grad(rhs, sv.Backprop(), controller=i_ctrl),
           "ndde InterpolatingAdjoint [GradientField forward-over-reverse] grad":
               ndde_grad(gf("forward-over-reverse"), sv.InterpolatingAdjoint()),
           "ndde InterpolatingAdjoint [GradientField reverse-over-reverse] grad":
               ndde_grad(gf("reverse-over-reverse"), sv.InterpolatingAdjoint()),
           ref: jax.jit(jax.grad(lambda p: loss(dfx(p).ys)))}
    stats = jax.jit(lambda p: sv.solve(prob, p, **kw).stats)(params)
    n_i = int(jax.jit(lambda p: sv.solve(prob, p, controller=i_ctrl, **kw).stats["steps"])(params))
    n_dfx = int(jax.jit(lambda p: dfx(p).stats["num_steps"])(params))
    evals = int(stats["rhs_evals"])
    f_rhs = _flops(lambda x, p: rhs(0.0, x, p), x0, params)
    f_vjp = _flops(lambda x, p, v: jax.vjp(lambda x, p: rhs(0.0, x, p), x, p)[1](v), x0, params, x0)
    ok, times = _section(f"## HNN, B = {B} (one batched system; ndde {int(stats['steps'])} steps ({n_i} with the I "
                         f"controller), {evals} rhs evaluations; diffrax {n_dfx} steps; one rhs {f_rhs / 1e9:.3f} GFLOP, one rhs VJP "
                         f"{f_vjp / 1e9:.3f} GFLOP)",
                         ["case", "median (ms)", "compile (s)", "/ diffrax RCA (paired)", "rel. diff to diffrax RCA",
                          "useful TFLOP/s (% of matmul ceiling)"], fns, params)
    g_ref = ok[ref][0](params) if ref in ok else None
    for name, (fn, comp) in ok.items():
        t = statistics.median(times[name])
        grad = name.endswith("grad")
        useful = evals * (f_rhs + (f_vjp if grad else 0.0))
        ratio = f"{paired_ratio(times, name, ref):.2f}" if grad and ref in ok else ""
        if not grad and "diffrax forward" in ok and name != "diffrax forward":
            ratio = f"{paired_ratio(times, name, 'diffrax forward'):.2f} (vs diffrax forward)"
        diff = f"{_rel(fn(params), g_ref):.1e}" if grad and g_ref is not None else ""
        counted = name.startswith("ndde") and "I controller" not in name  # evals counted with the PI controller
        flops = f"{useful / t / 1e12:.1f} ({100 * useful / t / peak:.0f}%)" if counted else ""
        emit(f"| {name} | {t * 1e3:.1f} | {comp:.0f} | {ratio} | {diff} | {flops} |")


def dde(B):
    rhs, params, x_hist = ndde_setup(B, dtype=jnp.float32)
    prob = sv.DDEProblem(rhs, lambda t, p: x_hist, lambda p: jnp.array([1.0], jnp.float32), 0.0, 10.0)
    loss = lambda ys: jnp.mean(ys**2)
    scan = lambda p: rk4_method_of_steps(rhs, p, x_hist, 1.0, 10.0, 32)[-1]
    solve = lambda p, sens=sv.InterpolatingAdjoint(): sv.solve(prob, p, rtol=1e-5, atol=1e-7, sensitivity=sens).ys[-1]
    ref = "RK4 scan 32/τ grad"
    fns = {"ndde forward": jax.jit(solve), "RK4 scan 32/τ forward": jax.jit(scan),
           "ndde InterpolatingAdjoint grad": jax.jit(jax.grad(lambda p: loss(solve(p)))),
           "ndde InterpolatingAdjoint(checkpoints=4) grad":
               jax.jit(jax.grad(lambda p: loss(solve(p, sv.InterpolatingAdjoint(checkpoints=4))))),
           ref: jax.jit(jax.grad(lambda p: loss(scan(p))))}
    stats = jax.jit(lambda p: sv.solve(prob, p, rtol=1e-5, atol=1e-7).stats)(params)
    ok, times = _section(f"## Neural DDE, B = {B} (ndde rtol 1e-5: {int(stats['steps'])} steps, "
                         f"{int(stats['rhs_evals'])} rhs evaluations; scan: 320 steps × 4 evaluations)",
                         ["case", "median (ms)", "compile (s)", "/ RK4 scan (paired)", "rel. diff to scan"], fns, params)
    outs = {n: f(params) for n, (f, _) in ok.items()}
    for name, (fn, comp) in ok.items():
        t = statistics.median(times[name])
        peer = ref if name.endswith("grad") else "RK4 scan 32/τ forward"
        ratio = f"{paired_ratio(times, name, peer):.2f}" if peer in ok else ""
        diff = f"{_rel(outs[name], outs[peer]):.1e}" if peer in ok else ""
        emit(f"| {name} | {t * 1e3:.1f} | {comp:.0f} | {ratio} | {diff} |")


def main():
    t0 = time.perf_counter()
    emit(f"# GPU results: {CARD}")
    emit()
    emit(f"float32, jax_default_matmul_precision=highest; medians of {ROUNDS} interleaved rounds; "
         "bench/gpu.sh. Ratios are medians of back-to-back pairs in those rounds.")
    emit()
    peak = ceilings()
    for B in [int(b) for b in os.environ.get("GPU_BENCH_HNN_SIZES", "256,4096,65536").split(",") if b]:
        hnn(B, peak)
    B = int(os.environ.get("GPU_BENCH_DDE_SIZE", "65536"))
    if B:
        dde(B)
    emit()
    emit(f"Whole run: {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
