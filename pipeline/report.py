"""``ndde report RUN_DIR``: one PNG with the loss curve, true vs predicted trajectories on
the held-out data (from the newest checkpoint that verifies), and the learned delay."""

from __future__ import annotations

import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import CheckpointManager, read_attrs
from .data import digest, read_rows, validate
from .models import build_model
from .runner import load_run_job
from .shard import error_line
from .train import make_optimizer


def observed_mse(pred, ys, mask) -> float:
    """Mean squared error over the observed points (``mask``) only: a missing observation counts
    for nothing, a NaN prediction at an observed point makes the result NaN (never hidden)."""
    mask = np.asarray(mask, bool)
    return float(np.sum(np.where(mask, (np.asarray(pred) - np.asarray(ys)) ** 2, 0.0)) / mask.sum())


def held_out_prediction(job, params, n_show=3, n_fine=200):
    """(ts, ys_true, fine_ts, ys_pred_fine, mse at the data times) for the first held-out rows."""
    model = build_model(job)
    lo = job.data.n_train
    rows = read_rows(job.data_path, job, lo, lo + job.data.n_test, model.dtype)
    ts = jnp.asarray(rows["ts"])
    ys_true = np.where(rows["mask"], rows["ys"], np.nan)
    fine = jnp.linspace(ts[0], ts[-1], n_fine, dtype=model.dtype)
    predict = jax.jit(jax.vmap(lambda s, grid: model.solve(job, params, s, grid).ys, in_axes=(0, None)))
    samples = {"x0": jnp.asarray(rows["x0"])}
    mse = observed_mse(np.asarray(predict(samples, ts)), rows["ys"], rows["mask"])
    first = {k: v[:n_show] for k, v in samples.items()}
    return np.asarray(ts), ys_true[:n_show], np.asarray(fine), np.asarray(predict(first, fine)), mse


def _data_changed(data_path, checkpoint) -> str | None:
    """Why the held-out fit would be drawn against other data than the run's, or None: the file's
    contents differ from those the checkpoint recorded (regenerated with another noise, say)."""
    recorded = read_attrs(checkpoint).get("data_sha256")
    if recorded is None or recorded == digest(data_path):
        return None
    return (f"the contents of {data_path} changed since {pathlib.Path(checkpoint).name} was written (its sha256 "
            "differs from the checkpoint's data_sha256): the held-out fit would be against other data")


def write_report(run_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = pathlib.Path(run_dir)
    job = load_run_job(run_dir)
    manager = CheckpointManager(run_dir / "checkpoints")
    step = manager.latest_valid_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint that verifies; nothing to report")
    model = build_model(job)
    theta0 = model.theta0
    restored = manager.restore(step, theta0, make_optimizer(job).init(theta0))
    params = jax.tree_util.tree_map(jnp.asarray, restored.params)
    validate(job.data_path, job)  # a missing or misshapen data file is an error naming it
    failure, title = _data_changed(job.data_path, manager.path(step)), "the data file changed"
    if failure is None:
        try:
            ts, ys_true, fine, ys_pred, mse = held_out_prediction(job, params)
        except RuntimeError as err:  # the model cannot be solved at these parameters (a delay thrown far out)
            failure, title = error_line(err), "the model's solve failed"
    m = restored.metrics

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    steps = np.arange(1, len(m["loss"]) + 1)
    axes[0].semilogy(steps, m["loss"])
    axes[0].set(title=f"{job.name}: training loss", xlabel="step", ylabel="mean squared error")
    if failure is None:
        for i in range(ys_true.shape[0]):
            color = f"C{i}"
            axes[1].plot(ts, ys_true[i, :, 0], "o", color=color, ms=4, label="data" if i == 0 else None)
            axes[1].plot(fine, ys_pred[i, :, 0], "-", color=color, label="model" if i == 0 else None)
        axes[1].set(title=f"held-out trajectories (x[0]); MSE {mse:.2e}", xlabel="t", ylabel="x[0]")
        axes[1].legend()
    else:
        axes[1].text(0.02, 0.5, textwrap.fill(failure, 60), transform=axes[1].transAxes, va="center", fontsize=8)
        axes[1].set(title=f"held-out trajectories: {title}", xticks=[], yticks=[])
    if "tau" in m and np.any(np.isfinite(m["tau"])):
        axes[2].plot(steps, m["tau"])
        axes[2].set(title="learned delay τ", xlabel="step", ylabel="τ")
    else:
        axes[2].plot(steps, m["grad_norm"])
        axes[2].set(title="gradient norm (ODE model: no delay)", xlabel="step", yscale="log")
    fig.suptitle(f"{run_dir} — step {step}")
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    if failure is not None:
        return f"wrote {out} (step {step}; no held-out fit: {failure})"
    return f"wrote {out} (step {step}, held-out MSE {mse:.3e})"
