"""Gradient benchmark (issue: sensitivities). Prints tables, writes bench/results/grad.md and
bench/results/memory.png.

1. HNN (bench/problems.py, B = 256 as one system, float64, 50 observations, loss = mean of
   ys²): every ODE method next to diffrax's RecursiveCheckpointAdjoint and BacksolveAdjoint,
   same process: gradient time, grad/forward, relative difference to diffrax's gradient.
   Both GradientField VJP variants for the continuous adjoints.
2. Neural DDE (MLP 4-64-64-2, τ = 1, B = 256): gradient time and grad/forward per method
   (ForwardMode omitted: its cost is one jvp per parameter, thousands here).
3. Peak temporary memory of the compiled gradient vs T for Backprop and InterpolatingAdjoint
   (XLA's memory analysis of the compiled program; deterministic).
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import solvers as sv  # noqa: E402
from problems import diffrax_solve, hnn_setup, mlp, ndde_setup  # noqa: E402
from timing import interleaved_times, median_time, paired_ratio, write_results  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _rel(a, b):
    fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.max(jnp.abs(fa - fb)) / jnp.max(jnp.abs(fb)))


def hnn_rows(B=256):
    """Every timed callable runs in the same rounds (round-robin, ``interleaved_times``); the
    ratio to diffrax is the median over rounds of back-to-back pairs."""
    import diffrax

    H, J, rhs, params, x0 = hnn_setup(B)
    ts = jnp.linspace(0.0, 10.0, 50)
    kw = dict(saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False)
    loss = lambda ys: jnp.mean(ys**2)

    def dfx_solve(p, adjoint):
        return loss(diffrax_solve(rhs, x0, ts, p, adjoint).ys)

    ref = "diffrax RecursiveCheckpointAdjoint"
    fns = {"ndde forward (land_on_saveat=False)": jax.jit(lambda p: sv.solve(sv.ODEProblem(rhs, x0, 0.0, 10.0), p, **kw).ys),
           ref: jax.jit(jax.grad(lambda p: dfx_solve(p, diffrax.RecursiveCheckpointAdjoint()))),
           "diffrax BacksolveAdjoint": jax.jit(jax.grad(lambda p: dfx_solve(p, diffrax.BacksolveAdjoint())))}
    variants = [("Backprop", sv.Backprop(), rhs), ("Backprop, I controller (diffrax's default form)", sv.Backprop(), rhs)]
    for vjp in ("forward-over-reverse", "reverse-over-reverse"):
        field = sv.GradientField(lambda x, p: jnp.sum(mlp(p, x)), J, adjoint_vjp=vjp)
        for name, sens in (("BacksolveAdjoint", sv.BacksolveAdjoint()), ("InterpolatingAdjoint", sv.InterpolatingAdjoint()),
                           ("QuadratureAdjoint", sv.QuadratureAdjoint())):
            variants.append((f"{name} [GradientField {vjp}]", sens, field))
    for name, sens, field in variants:
        prob = sv.ODEProblem(field, x0, 0.0, 10.0)
        extra = {"controller": sv.PIController(beta_scale=0.0)} if "I controller" in name else {}
        fns[f"ndde {name}"] = jax.jit(jax.grad(lambda p, prob=prob, sens=sens, extra=extra: loss(
            sv.solve(prob, p, sensitivity=sens, **kw, **extra).ys)))
    g_ref = fns[ref](params)
    times = interleaved_times(fns, params, rounds=11)
    fwd = "ndde forward (land_on_saveat=False)"
    t_fwd = statistics.median(times[fwd])
    rows = []
    for name, fn in fns.items():
        t = statistics.median(times[name])
        grad_like = name != fwd
        rows.append((name, t, t / t_fwd if name.startswith("ndde") else None,
                     _rel(fn(params), g_ref) if grad_like else None,
                     paired_ratio(times, name, ref) if grad_like else None))
        if name == "ndde Backprop":
            n_params = ravel_pytree(params)[0].size
            rows.append((f"ndde ForwardMode: not timed (one jvp per parameter: {n_params} here)",) + (None,) * 4)
    return rows


def vmap_rows(B=256):
    """Each method under vmap over B single trajectories (a step size each) vs the same B as
    one batched system: time per call and the ratio."""
    H, J, rhs, params, x0 = hnn_setup(B)
    ts = jnp.linspace(0.0, 10.0, 50)
    kw = dict(saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False)
    field = sv.GradientField(lambda x, p: jnp.sum(mlp(p, x)), J)
    rows = []
    for name, sens, f in (("Backprop", sv.Backprop(), rhs), ("BacksolveAdjoint", sv.BacksolveAdjoint(), field),
                          ("InterpolatingAdjoint", sv.InterpolatingAdjoint(), field),
                          ("QuadratureAdjoint", sv.QuadratureAdjoint(), field)):
        one = lambda p, x, f=f, sens=sens: sv.solve(sv.ODEProblem(f, x, 0.0, 10.0), p, sensitivity=sens, **kw).ys
        batched = jax.jit(jax.grad(lambda p, one=one: jnp.mean(one(p, x0) ** 2)))
        vmapped = jax.jit(jax.grad(lambda p, one=one: jnp.mean(jax.vmap(one, in_axes=(None, 0))(p, x0) ** 2)))
        times = interleaved_times({"b": batched, "v": vmapped}, params, rounds=5)
        rows.append((name, statistics.median(times["b"]), statistics.median(times["v"]), paired_ratio(times, "v", "b")))
    return rows


def ndde_rows(B=256):
    rhs, params, x_hist = ndde_setup(B)
    prob = sv.DDEProblem(rhs, lambda t, p: x_hist, lambda p: jnp.array([1.0]), 0.0, 10.0)
    ts = jnp.linspace(0.5, 10.0, 20)
    loss = lambda ys: jnp.mean(ys**2)
    fwd = jax.jit(lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-8).ys)
    t_fwd = median_time(fwd, params)
    rows, grads = [("ndde forward", t_fwd, 1.0, None)], {}
    for name, sens in (("Backprop", sv.Backprop()), ("InterpolatingAdjoint", sv.InterpolatingAdjoint()),
                       ("QuadratureAdjoint", sv.QuadratureAdjoint())):
        fn = jax.jit(jax.grad(lambda p, s=sens: loss(sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-8,
                                                               sensitivity=s).ys)))
        grads[name] = fn(params)
        t = median_time(fn, params, repeats=5)
        rows.append((f"ndde {name}", t, t / t_fwd, None))
    ref = grads["Backprop"]
    rows = [(n, t, r, _rel(grads[n.split()[-1]], ref) if n.split()[-1] in grads else d) for n, t, r, d in rows]
    return rows


def memory_rows(B=64):
    rhs, params, x_hist = ndde_setup(B)
    out = []
    for T in (10.0, 40.0, 160.0):
        prob = sv.DDEProblem(rhs, lambda t, p: x_hist, lambda p: jnp.array([1.0]), 0.0, T)
        for name, sens in (("Backprop", sv.Backprop()), ("InterpolatingAdjoint(16)", sv.InterpolatingAdjoint(16))):
            max_steps = int(64 * T)
            f = jax.jit(jax.grad(lambda p, s=sens: jnp.mean(sv.solve(prob, p, rtol=1e-6, atol=1e-8, sensitivity=s,
                                                                       max_steps=max_steps).ys ** 2)))
            mem = f.lower(params).compile().memory_analysis()
            out.append((name, T, max_steps, mem.temp_size_in_bytes / 2**20))
    return out


def _plot(mem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({m[0] for m in mem}):
        pts = [(T, mb) for n, T, _, mb in mem if n == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="T (max_steps = 64 T)", ylabel="peak temp memory (MiB)",
           title="Neural DDE gradient, B = 64: compiled peak memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "memory.png", dpi=100)


def _fmt(rows, ratio_column=None):
    columns = ["case", "median time (s)", "grad / forward", "max rel. diff to reference"] + (
        [ratio_column] if ratio_column else [])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name, t, r, d, *q in rows:
        cell = lambda v, f: "" if v is None else format(v, f)
        line = f"| {name} | {cell(t, '.4f')} | {cell(r, '.2f')} | {cell(d, '.1e')} |"
        lines.append(line + (f" {cell(q[0], '.2f')} |" if ratio_column else ""))
    return "\n".join(lines)


def main():
    RESULTS.mkdir(exist_ok=True)
    hnn = hnn_rows()
    best = min(q for n, t, r, d, q in hnn if n.startswith("ndde ") and q is not None)
    vm = vmap_rows()
    dde = ndde_rows()
    mem = memory_rows()
    _plot(mem)
    text = ["## HNN gradient (B = 256, float64; reference: diffrax RecursiveCheckpointAdjoint; all timed in "
            "the same rounds)", _fmt(hnn, "time / diffrax RCA (median of paired ratios)"),
            f"\nbest ndde method / diffrax RecursiveCheckpointAdjoint = {best:.2f} (median of paired ratios)\n",
            "## HNN gradient under vmap (256 single trajectories) vs one batched system of 256",
            "| method | batched system (s) | vmap (s) | vmap / batched (median of paired ratios) |", "|---|---|---|---|"]
    text += [f"| {n} | {tb:.4f} | {tv:.4f} | {q:.2f} |" for n, tb, tv, q in vm]
    text += ["", "## Neural DDE gradient (B = 256, float64; reference: ndde Backprop)", _fmt(dde),
            "\n## Peak temporary memory of the compiled gradient (neural DDE, B = 64)",
            "| method | T | max_steps | MiB |", "|---|---|---|---|"]
    text += [f"| {n} | {T:g} | {ms} | {mb:.1f} |" for n, T, ms, mb in mem]
    write_results(RESULTS / "grad.md", text)


if __name__ == "__main__":
    main()
