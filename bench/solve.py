"""Forward-solve benchmark (issue: solvers). Prints a table and writes bench/results/solve.md.

1. HNN (MLP 2-64-64-1 tanh, rhs = J grad H with jax.grad inside, B = 256 as one system,
   t in [0, 10], 50 save points, Tsit5, rtol 1e-6, atol 1e-8, float64): ndde vs diffrax.
2. Neural DDE (MLP 4-64-64-2 on [x(t), x(t-1)], B = 256, t in [0, 10], constant history):
   ndde adaptive (rtol 1e-6) vs a fixed-step RK4 method-of-steps lax.scan with the
   smallest step count that reaches the same final error.
"""

from __future__ import annotations

import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import solvers as sv  # noqa: E402
from problems import diffrax_solve, hnn_setup, ndde_setup, rk4_method_of_steps  # noqa: E402
from timing import median_time, versions  # noqa: E402


def hnn_rows(B=256):
    H, J, rhs, params, x0 = hnn_setup(B)
    ts = jnp.linspace(0.0, 10.0, 50)
    prob = sv.ODEProblem(rhs, x0, 0.0, 10.0)
    ndde = jax.jit(lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-8))
    ndde_i = jax.jit(lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False))
    ndde_ic = jax.jit(lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False,
                                         controller=sv.PIController(beta_scale=0.0)))
    dfx = jax.jit(lambda p: diffrax_solve(rhs, x0, ts, p))
    a, ai, aic, b = ndde(params), ndde_i(params), ndde_ic(params), dfx(params)
    t_n, t_i, t_d = median_time(ndde, params), median_time(ndde_i, params), median_time(dfx, params)
    t_ic = median_time(ndde_ic, params)
    diff = float(jnp.max(jnp.abs(a.ys - b.ys)))
    diff_i = float(jnp.max(jnp.abs(ai.ys - b.ys)))
    return [("HNN forward, ndde Tsit5, lands on 50 save times (default)", t_n, int(a.stats["steps"]), ""),
            ("HNN forward, ndde Tsit5, land_on_saveat=False", t_i, int(ai.stats["steps"]), ""),
            ("HNN forward, diffrax Tsit5", t_d, int(b.stats["num_accepted_steps"]), ""),
            ("ratio ndde (landing) / diffrax", t_n / t_d, None, f"max abs ys diff = {diff:.1e}"),
            ("ratio ndde (interpolating) / diffrax", t_i / t_d, None, f"max abs ys diff = {diff_i:.1e}"),
            ("HNN forward, ndde interpolating, I controller (beta_scale=0, diffrax's default form)", t_ic,
             int(aic.stats["steps"]), ""),
            ("ratio ndde (interpolating, I controller) / diffrax", t_ic / t_d, None, "")]


def ndde_rows(B=256):
    rhs, params, x_hist = ndde_setup(B)
    prob = sv.DDEProblem(rhs, lambda t, p: x_hist, lambda p: jnp.array([1.0]), 0.0, 10.0)
    ref = sv.solve(prob, params, rtol=1e-12, atol=1e-14, max_steps=20000).ys[-1]
    ndde = jax.jit(lambda p: sv.solve(prob, p, rtol=1e-6, atol=1e-8))
    sol = ndde(params)
    err = float(jnp.max(jnp.abs(sol.ys[-1] - ref)))
    chosen = None
    for n in (4, 8, 16, 32, 64, 128):
        rk4 = jax.jit(lambda p, n=n: rk4_method_of_steps(rhs, p, x_hist, 1.0, 10.0, n)[-1])
        e = float(jnp.max(jnp.abs(rk4(params) - ref)))
        chosen = (n, rk4, e)
        if e <= err:
            break
    n, rk4, e = chosen
    t_n, t_r = median_time(ndde, params), median_time(rk4, params)
    return [(f"DDE forward, ndde Tsit5 rtol 1e-6 (error {err:.1e})", t_n, int(sol.stats["steps"]), ""),
            (f"DDE forward, RK4 scan {n}/tau (error {e:.1e})", t_r, 10 * n, ""),
            ("ratio ndde / RK4 scan", t_n / t_r, None, "")]


def main():
    rows = hnn_rows() + ndde_rows()
    lines = ["| case | median time (s) or ratio | steps | note |", "|---|---|---|---|"]
    for name, t, steps, note in rows:
        lines.append(f"| {name} | {t:.4f} | {'' if steps is None else steps} | {note} |")
    ver = versions()
    text = "\n".join(lines) + "\n\n" + ", ".join(f"{k} {v}" for k, v in ver.items()) + "\n"
    print(text)
    out = pathlib.Path(__file__).resolve().parent / "results" / "solve.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
