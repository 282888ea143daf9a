"""Slurm overheads on the local single-node cluster (slurm/local-cluster.sh start first):
time from `ndde submit` to the first training step, and the extra wall time of one
preempt (USR1) -> checkpoint -> requeue -> resume cycle, the ~2 min BeginTime hold of a
requeued job excluded (released with `scontrol update StartTime=now` 2 s after the requeue,
not in the requeue's own second: see tests/test_slurm.py::wait_done).
Writes bench/results/slurm.md.

    .venv/bin/python bench/slurm.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
NDDE = pathlib.Path(sys.executable).parent / "ndde"
STEPS = 300


def submit(job, run_dir, *sets):
    out = subprocess.run([str(NDDE), "submit", str(job), "--run-dir", str(run_dir), "--backend", "mpi",
                          "--ntasks-per-node", "2", "--steps", str(STEPS), *sets],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def queued(job_id):
    """[state, reason] while the job is queued, None once it has left (a failed squeue: ["?", ""])."""
    res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
    if res.returncode != 0:
        return ["?", ""]
    return res.stdout.split() if res.stdout.strip() else None


def one_run(job, run_dir, preempt: bool):
    t0 = time.perf_counter()
    job_id = submit(job, run_dir, "--set", "checkpoint.every=1", "--set", "checkpoint.keep=1000")
    ckpts = run_dir / "checkpoints"
    first = running = held = None
    signalled = False
    while True:
        state = queued(job_id)
        now = time.perf_counter()
        if state is None:
            break
        if running is None and state[0] == "RUNNING":
            running = now - t0
        if first is None and (ckpts / "step_00000001.h5").exists():
            first = now - t0
        if preempt and not signalled and (ckpts / "step_00000010.h5").exists():
            subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
            signalled = True
        if state[0] == "PENDING" and state[1] == "BeginTime":
            held = now if held is None else held
            if now - held >= 2.0:  # not in the requeue's second: see tests/test_slurm.py::wait_done
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
        time.sleep(0.02)
    total = time.perf_counter() - t0
    log = next(run_dir.glob("slurm-*.out")).read_text()
    assert "training exited with code 0" in log, log
    if preempt:
        assert "requeueing job" in log, log
    return running, first, total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    job = tmp / "tiny.toml"
    job.write_text((ROOT / "tests" / "pipeline_helpers.py").read_text().split('TINY_HNN = """')[1].split('"""')[0]
                   .format(data=tmp / "tiny.h5", steps=STEPS, every=5, sensitivity="backprop"))
    subprocess.run([str(NDDE), "data", str(job)], check=True, capture_output=True)
    rows = {"plain": [], "preempted": []}
    for i in range(args.repeats):
        for kind in rows:
            rows[kind].append(one_run(job, tmp / f"{kind}-{i}", kind == "preempted"))
            print(kind, rows[kind][-1], flush=True)
    med = {k: [statistics.median(r[j] for r in v) for j in range(3)] for k, v in rows.items()}
    extra = med["preempted"][2] - med["plain"][2]
    text = "\n".join([
        "# Slurm overheads (local single-node Slurm 22.05, 2 cores)", "",
        f"Job: the tests' tiny HNN job (MLP 2-8-1, batch 4), {STEPS} steps, backend mpi with 2 ranks "
        "(the venv's mpiexec inside the allocation), a checkpoint every step. Medians of "
        f"{args.repeats} runs each.", "",
        "| | submit -> RUNNING (s) | submit -> first step done (s) | submit -> completed (s) |",
        "|---|---|---|---|",
        *[f"| {k} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} |" for k, m in med.items()], "",
        f"Extra wall time of one USR1 -> checkpoint -> requeue -> resume cycle: {extra:.2f} s "
        "(BeginTime hold released 2 s after the requeue; most of the rest is the new job's start and JAX "
        "compilation).", ""])
    (ROOT / "bench" / "results" / "slurm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
