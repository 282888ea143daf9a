"""Neural DDE gradients against their peers (performance issue). Writes bench/results/dde.md.

Problem (bench/problems.py): MLP 4-64-64-2 on [x(t), x(t - 1)], B = 256, t in [0, 10],
constant history, loss = mean of x² at 20 observation times (0.5, 1, ..., 10), float64.

* ndde adaptive Tsit5 at rtol 1e-6: forward and the gradient by each DDE method.
* A plain fixed-step RK4 method-of-steps `lax.scan` (bench/problems.py) with the smallest
  steps per tau that reach ndde's final error; gradient by reverse mode with each step
  rematerialised (`jax.checkpoint`, the cheaper form on CPU) and without.
* torchdde 0.1.3 RK4 at the same step (optional: `pip install torch torchdde`, see README):
  forward, backprop (discretize_then_optimize=True) and its adjoint.

Every gradient is compared with the exact one (ndde QuadratureAdjoint at rtol 1e-11).

    .venv/bin/python bench/dde.py
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import solvers as sv  # noqa: E402
from problems import ndde_setup, rk4_method_of_steps  # noqa: E402
from timing import median_time, write_results  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TS = np.linspace(0.5, 10.0, 20)


def _rel(g, ref):
    g, ref = np.asarray(ravel_pytree(g)[0]), np.asarray(ravel_pytree(ref)[0])
    return float(np.max(np.abs(g - ref)) / np.max(np.abs(ref)))


def scan_loss(rhs, x_hist, n, remat=False):
    idx = np.rint(TS * n).astype(int)  # observation grid indices (h = 1/n, tau = 1)
    return lambda p: jnp.mean(rk4_method_of_steps(rhs, p, x_hist, 1.0, 10.0, n, remat=remat)[idx] ** 2)


def torchdde_rows(params, x_hist, n, g_ref):
    try:
        import torch
        from torchdde import RK4, integrate
    except ImportError:
        return [("torchdde: not installed (pip install torch torchdde)", None, None, None)]
    torch.set_num_threads(2)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList()
            for w, b in params:
                lin = torch.nn.Linear(w.shape[0], w.shape[1]).double()
                lin.weight.data = torch.tensor(np.asarray(w).T.copy())
                lin.bias.data = torch.tensor(np.asarray(b))
                self.layers.append(lin)
            self.delays = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64), requires_grad=False)

        def forward(self, t, y, args, history):
            z = torch.cat([y, history[0]], dim=-1)
            for lin in self.layers[:-1]:
                z = torch.tanh(lin(z))
            return self.layers[-1](z) - 0.5 * y

    field = Field()
    hist = torch.tensor(np.asarray(x_hist))
    ts = torch.tensor(TS)
    t0, t1, dt = torch.tensor(0.0, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64), 1.0 / n

    def loss(dto):
        ys = integrate(field, RK4(), t0, t1, ts, lambda t: hist, None, dt0=torch.tensor(dt, dtype=torch.float64),
                       delays=field.delays, discretize_then_optimize=dto, max_steps=20 * n + 10)
        return torch.mean(ys ** 2)

    def forward():
        with torch.no_grad():
            loss(True)

    def grad(dto):
        field.zero_grad()
        loss(dto).backward()
        return [(lin.weight.grad.numpy().T.copy(), lin.bias.grad.numpy().copy()) for lin in field.layers]

    rows = [("torchdde RK4 forward", _wall(forward), None, None)]
    for name, dto in (("backprop", True), ("adjoint", False)):
        g = grad(dto)
        rows.append((f"torchdde RK4 gradient, {name}", _wall(lambda: grad(dto)), None, _rel(g, g_ref)))
    return rows


def _wall(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    RESULTS.mkdir(exist_ok=True)
    rhs, params, x_hist = ndde_setup(256)
    prob = sv.DDEProblem(rhs, lambda t, p: x_hist, lambda p: jnp.array([1.0]), 0.0, 10.0)
    ts = jnp.asarray(TS)
    ndde_loss = lambda s, rtol=1e-6, atol=1e-8, **kw: (
        lambda p: jnp.mean(sv.solve(prob, p, saveat=ts, rtol=rtol, atol=atol, sensitivity=s, **kw).ys ** 2))
    g_ref = jax.jit(jax.grad(ndde_loss(sv.QuadratureAdjoint(), 1e-11, 1e-13, max_steps=40000)))(params)
    y_ref = sv.solve(prob, params, rtol=1e-12, atol=1e-14, max_steps=40000).ys[-1]

    fwd = jax.jit(lambda p: sv.solve(prob, p, saveat=ts, rtol=1e-6, atol=1e-8).ys)
    err = float(jnp.max(jnp.abs(fwd(params)[-1] - y_ref)))
    t_fwd = median_time(fwd, params)
    rows = [(f"ndde forward, Tsit5 rtol 1e-6 (final error {err:.1e})", t_fwd, 1.0, None)]
    for name, s in (("InterpolatingAdjoint(16)", sv.InterpolatingAdjoint()), ("QuadratureAdjoint", sv.QuadratureAdjoint()),
                    ("Backprop", sv.Backprop())):
        fn = jax.jit(jax.grad(ndde_loss(s)))
        g = fn(params)
        rows.append((f"ndde gradient, {name}", median_time(fn, params, repeats=5), None, _rel(g, g_ref)))

    for n in (8, 16, 32, 64):
        e = float(jnp.max(jnp.abs(rk4_method_of_steps(rhs, params, x_hist, 1.0, 10.0, n)[-1] - y_ref)))
        if e <= err:
            break
    scan_fwd = jax.jit(scan_loss(rhs, x_hist, n))
    t_scan = median_time(scan_fwd, params)
    rows.append((f"RK4 scan forward, {n} steps per tau (final error {e:.1e})", t_scan, None, None))
    for name, loss in (("per-step remat", scan_loss(rhs, x_hist, n, remat=True)), ("stored", scan_loss(rhs, x_hist, n))):
        fn = jax.jit(jax.grad(loss))
        g = fn(params)
        rows.append((f"RK4 scan gradient, {name}", median_time(fn, params, repeats=5), None, _rel(g, g_ref)))
    rows += torchdde_rows(params, x_hist, n, g_ref)

    t = {name: time for name, time, *_ in rows}
    t_interp = t["ndde gradient, InterpolatingAdjoint(16)"]
    t_scan_g = min(v for k, v in t.items() if k.startswith("RK4 scan gradient"))
    ratios = [f"InterpolatingAdjoint grad / ndde forward = {t_interp / t_fwd:.2f}",
              f"InterpolatingAdjoint grad / best RK4 scan gradient = {t_interp / t_scan_g:.2f}"]
    if "torchdde RK4 gradient, backprop" in t:
        ratios.append(f"InterpolatingAdjoint grad / torchdde backprop = {t_interp / t['torchdde RK4 gradient, backprop']:.2f}")
    lines = ["## Neural DDE gradient vs peers (B = 256, float64, CPU)",
             "| case | median time (s) | max rel. diff of the gradient to the exact one |", "|---|---|---|"]
    for name, time_s, _, d in rows:
        lines.append(f"| {name} | {'' if time_s is None else f'{time_s:.4f}'} | {'' if d is None else f'{d:.1e}'} |")
    lines += [""] + [f"* {r}" for r in ratios]
    write_results(RESULTS / "dde.md", lines)


if __name__ == "__main__":
    main()
