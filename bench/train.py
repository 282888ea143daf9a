"""Training throughput of `delayed_gradient` (steps/s, one step = the whole batch) on each
backend, and the time a checkpoint save takes. Writes bench/results/train-B<batch>.md.

Each configuration runs `ndde train` in a fresh process (as a user would); its per-step wall
times come from the run's checkpoint; step 1 (compilation) is excluded and the median of
the rest is taken.

    .venv/bin/python bench/train.py [--batch 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent


def run(job, run_dir, backend, workers, steps, data, batch):
    cmd = [str(BIN / "ndde"), "train", str(job), "--run-dir", str(run_dir), "--steps", str(steps),
           "--set", f"train.batch_size={batch}", "--set", f"data.n_train={batch}",
           "--set", f'data.path="{data}"', "--set", f"checkpoint.every={steps}"]
    if backend == "mpi":
        cmd = [str(BIN / "mpiexec"), "-n", str(workers), *cmd, "--backend", "mpi"]
    else:
        cmd += ["--backend", backend, "--workers", str(workers)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    total = time.perf_counter() - t
    with h5py.File(run_dir / "checkpoints" / f"step_{steps:08d}.h5") as f:
        wall = f["metrics/wall_time"][...]
        loss = f["metrics/loss"][-1]
    return statistics.median(wall[1:]), wall[0], total, loss


def save_time(run_dir, repeats=20):
    sys.path.insert(0, str(ROOT))
    from pipeline import config
    from pipeline.checkpoint import CheckpointManager
    from pipeline.runner import load_run_job
    from pipeline.train import Trainer  # noqa: F401  (import cost outside the timing)

    job = load_run_job(run_dir)
    newest = sorted((run_dir / "checkpoints").glob("step_*.h5"))[-1]
    with h5py.File(newest) as f:
        tree = {g: {n: f[g][n][...] for n in _datasets(f[g])} for g in ("params", "opt_state", "metrics")}
        size = newest.stat().st_size
    manager = CheckpointManager(pathlib.Path(tempfile.mkdtemp()), keep=2)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        manager.save(i + 1, tree["params"], tree["opt_state"], np.zeros(2, np.uint64), tree["metrics"],
                     config.from_toml_text(job.to_toml()).to_toml())
        times.append(time.perf_counter() - t)
    return statistics.median(times), size


def _datasets(group):
    names = []
    group.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    job = ROOT / "jobs" / "delayed_gradient.toml"
    tmp = pathlib.Path(tempfile.mkdtemp())
    data = tmp / f"dg-{args.batch}.h5"
    configs = [("local", 1), ("dask", 1), ("dask", 2), ("mpi", 2)]
    rows = []
    for backend, workers in configs:
        step_s, first, total, loss = run(job, tmp / f"{backend}{workers}", backend, workers, args.steps, data,
                                         args.batch)
        rows.append((backend, workers, step_s, first, total, loss))
        print(backend, workers, f"{step_s:.3f} s/step", f"first {first:.1f} s", f"total {total:.1f} s",
              flush=True)
    save_s, size = save_time(tmp / "local1")
    base = {(b, w): s for b, w, s, *_ in rows}
    out = [f"# Training throughput: delayed_gradient, B = {args.batch} per step",
           "", f"Machine: {os.uname().machine}, {os.cpu_count()} cores, CPU, float64. Median of steps 2..{args.steps} "
           "(step 1 compiles); one step = value_and_grad over the whole batch + one adam update.", "",
           "| backend | workers | s/step | steps/s | speed-up vs local, 1 process | "
           "vs 1 worker of the same backend | first step (compile) s |", "|---|---|---|---|---|---|---|"]
    for backend, workers, step_s, first, total, loss in rows:
        one = base.get((backend, 1), base[("local", 1)])
        out.append(f"| {backend} | {workers} | {step_s:.3f} | {1 / step_s:.2f} | "
                   f"{base[('local', 1)] / step_s:.2f}x | {one / step_s:.2f}x | {first:.1f} |")
    out += ["", "One process alone already uses both cores (XLA's CPU backend); with several workers on a "
            "node each is pinned to its own block of cores (backend.pin_cpus, default true)."]
    out += ["", f"Checkpoint save (params + adam state + metrics, {size / 1024:.0f} KiB, fsync + rename): "
            f"median {save_s * 1000:.1f} ms over 20 saves.", ""]
    dest = ROOT / "bench" / "results" / f"train-B{args.batch}.md"
    dest.write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
