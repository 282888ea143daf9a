"""How fast can any solver take the HNN gradient on this machine? (issues: sensitivities, performance)

The HNN of bench/grad.py (B = 256 as one system, float64, t in [0, 10], 50 observations,
loss = mean of ys²). A Tsit5 gradient that takes n steps evaluates the rhs 6n + 1 times
forward (FSAL) and needs 6n stage VJPs backward, each of which evaluates the rhs again
unless every stage's residuals are stored. Timed in the same rounds (``interleaved_times``):

1. diffrax's RecursiveCheckpointAdjoint gradient (the reference) and forward, ndde's forward
   and its Backprop gradient with its PI controller and with the I controller diffrax uses
   (and, with the I controller, through equinox's checkpointed loop: Backprop(checkpoints=64));
2. the bare loop: n Tsit5 steps of constant size in a ``lax.scan`` (no error estimate, no step
   size selection, no save-time interpolation; loss of the step values), its gradient with
   every step recomputed (``jax.checkpoint``) and with every step's residuals stored, for
   n = the steps diffrax takes and the steps ndde's I controller takes;
3. the arithmetic alone: 6n rhs evaluations, and 6n rhs VJPs, each in a ``fori_loop``.

Whatever a solver adds to the bare loop (error control, interpolation, checkpoint
bookkeeping) can only cost more, so the bare loop's time over diffrax's is a lower bound on
the ratio any method taking as many steps reaches here. The InterpolatingAdjoint bound uses
3: its sweep lands on each of the 50 observations (λ jumps there), at least 6 stage VJPs per
step, against the forward's own time. Writes results/floor.md.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import solvers as sv  # noqa: E402
from problems import diffrax_solve, hnn_setup  # noqa: E402
from timing import interleaved_times, paired_ratio, write_results  # noqa: E402

T, N_OBS = 10.0, 50


def bare_tsit5_loss(rhs, x0, n, remat):
    """Loss of n constant Tsit5 steps over [0, T] (FSAL: 6 new rhs evaluations per step)."""
    tab = sv.Tsit5().tableau
    A, b, h = tab.a_matrix(), np.asarray(tab.b), T / n

    def loss(p):
        def step(carry, _):
            x, k1 = carry
            ks = [k1]
            for i in range(1, tab.stages):
                xi = x + h * sum(A[i, j] * ks[j] for j in range(i) if A[i, j] != 0.0)
                ks.append(rhs(0.0, xi, p))
            x_new = x + h * sum(b[j] * ks[j] for j in range(tab.stages) if b[j] != 0.0)
            return (x_new, ks[-1]), x_new

        body = jax.checkpoint(step) if remat else step
        _, xs = jax.lax.scan(body, (x0, rhs(0.0, x0, p)), None, length=n)
        return jnp.mean(xs**2)

    return loss


def arithmetic(rhs, x0, count):
    """count rhs evaluations, and count rhs VJPs (x and p parts), in dependent chains."""

    def evals(p):
        return jax.lax.fori_loop(0, count, lambda i, x: x + 1e-3 * rhs(0.0, x, p), x0)

    def vjps(p):
        def body(i, carry):
            lam, gp = carry
            _, pull = jax.vjp(lambda x, q: rhs(0.0, x, q), x0 + 1e-3 * lam, p)
            gx, gq = pull(lam)
            return lam + 1e-3 * gx, jax.tree.map(jnp.add, gp, gq)

        return jax.lax.fori_loop(0, count, body, (x0, jax.tree.map(jnp.zeros_like, p)))

    return jax.jit(evals), jax.jit(vjps)


def main():
    H, J, rhs, params, x0 = hnn_setup(256)
    ts = jnp.linspace(0.0, T, N_OBS)
    kw = dict(saveat=ts, rtol=1e-6, atol=1e-8, land_on_saveat=False)
    loss = lambda ys: jnp.mean(ys**2)

    dfx_sol = lambda p: diffrax_solve(rhs, x0, ts, p, t1=T)

    prob = sv.ODEProblem(rhs, x0, 0.0, T)
    i_ctl = {"controller": sv.PIController(beta_scale=0.0)}
    dfx_stats = dfx_sol(params).stats
    n_dfx, rej_dfx = int(dfx_stats["num_accepted_steps"]), int(dfx_stats["num_rejected_steps"])
    (n_pi, rej_pi), (n_i, rej_i) = [(int(s["steps"]), int(s["rejected"])) for s in (
        sv.solve(prob, params, **kw).stats, sv.solve(prob, params, **kw, **i_ctl).stats)]

    ref = "diffrax RecursiveCheckpointAdjoint gradient"
    fns = {ref: jax.jit(jax.grad(lambda p: loss(dfx_sol(p).ys))),
           "diffrax forward": jax.jit(lambda p: dfx_sol(p).ys),
           "ndde forward (PI controller)": jax.jit(lambda p: sv.solve(prob, p, **kw).ys),
           "ndde Backprop gradient (PI controller)": jax.jit(jax.grad(
               lambda p: loss(sv.solve(prob, p, sensitivity=sv.Backprop(), **kw).ys))),
           "ndde Backprop gradient (I controller)": jax.jit(jax.grad(
               lambda p: loss(sv.solve(prob, p, sensitivity=sv.Backprop(), **kw, **i_ctl).ys))),
           "ndde Backprop(checkpoints=64) gradient (I controller; equinox's checkpointed loop)": jax.jit(jax.grad(
               lambda p: loss(sv.solve(prob, p, sensitivity=sv.Backprop(checkpoints=64), **kw, **i_ctl).ys)))}
    for n in sorted({n_dfx, n_i}):
        fns[f"bare loop, {n} steps, forward"] = jax.jit(bare_tsit5_loss(rhs, x0, n, remat=True))
        for remat, how in ((True, "recomputed"), (False, "stored")):
            fns[f"bare loop, {n} steps, gradient, steps {how}"] = jax.jit(jax.grad(bare_tsit5_loss(rhs, x0, n, remat)))
    n_eval = 6 * n_dfx
    fns[f"{n_eval} rhs evaluations"], fns[f"{n_eval} rhs VJPs"] = arithmetic(rhs, x0, n_eval)
    times = interleaved_times(fns, params, rounds=11)

    rows = [(name, statistics.median(times[name]), paired_ratio(times, name, ref)) for name in fns]
    med = {name: t for name, t, _ in rows}
    per_eval, per_vjp = med[f"{n_eval} rhs evaluations"] / n_eval, med[f"{n_eval} rhs VJPs"] / n_eval
    t_fwd = med["ndde forward (PI controller)"]
    interp_bound = 1.0 + 6 * N_OBS * per_vjp / t_fwd
    lines = [f"Accepted + rejected steps: diffrax {n_dfx} + {rej_dfx}, ndde PI controller {n_pi} + {rej_pi}, "
             f"ndde I controller {n_i} + {rej_i}.", "",
             "| case | median time (s) | / diffrax RecursiveCheckpointAdjoint (median of paired ratios) |",
             "|---|---|---|"]
    lines += [f"| {name} | {t:.4f} | {r:.2f} |" for name, t, r in rows]
    lines += ["", f"* one rhs evaluation {per_eval * 1e6:.0f} µs, one rhs VJP {per_vjp * 1e6:.0f} µs "
              f"({per_vjp / per_eval:.2f}x) inside a loop",
              f"* lower bound of InterpolatingAdjoint grad / forward here: 1 + 6 × {N_OBS} VJPs / forward "
              f"= {interp_bound:.1f}"]
    write_results(pathlib.Path(__file__).resolve().parent / "results" / "floor.md",
                  ["# HNN gradient: the bare loop against the solvers", ""] + lines)


if __name__ == "__main__":
    main()
