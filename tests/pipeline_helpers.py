"""Small jobs and subprocess helpers for the pipeline tests."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY_HNN = """
name = "tiny_hnn"
[model]
kind = "hnn"
hidden = [8]
[data]
system = "pendulum"
path = "{data}"
n_train = 8
n_test = 2
t1 = 1.0
n_times = 6
[solver]
rtol = 1e-6
atol = 1e-8
sensitivity = "{sensitivity}"
[train]
steps = {steps}
batch_size = 4
[optimizer]
learning_rate = 1e-2
[backend]
kind = "local"
workers = 2
[checkpoint]
every = {every}
keep = 3
"""


def tiny_job(tmp_path, steps=6, every=2, sensitivity="backprop", name="job.toml", data=None):
    data = data or (tmp_path / "tiny.h5")
    path = tmp_path / name
    path.write_text(TINY_HNN.format(data=data, steps=steps, every=every, sensitivity=sensitivity))
    return path


def ndde(*args, env=None, check=True, timeout=600, mpi_ranks=None):
    """Run the ndde CLI in a fresh process (under `mpiexec -n R` when mpi_ranks is set)."""
    cmd = [str(BIN / "ndde"), *map(str, args)]
    if mpi_ranks:
        cmd = [str(BIN / "mpiexec"), "-n", str(mpi_ranks), *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def params_of(path):
    """Every dataset under /params and /opt_state of a checkpoint, as numpy arrays."""
    out = {}
    with h5py.File(path, "r") as f:
        for group in ("params", "opt_state"):
            f[group].visititems(lambda n, o: out.__setitem__(f"{group}/{n}", o[...])
                                if isinstance(o, h5py.Dataset) else None)
    return out


def assert_same_bits(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert pa[key].dtype == pb[key].dtype and np.array_equal(pa[key], pb[key]), key


def start_train(job, run_dir, env=None, *extra):
    """`ndde train JOB --run-dir RUN_DIR` as a background process (stderr piped)."""
    return subprocess.Popen([str(BIN / "ndde"), "train", str(job), "--run-dir", str(run_dir), *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def wait_for(predicate, proc, timeout=300):
    """Poll predicate() until true; fails when proc ends first or after timeout seconds."""
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended early: {proc.stderr.read().decode()}"
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def sigkill_mid_step_then_resume(job, run_dir, step, final, *extra):
    """Train JOB into RUN_DIR, SIGKILL it while step ``step`` sleeps after computing (the
    checkpoint of step - 1 written), check that no checkpoint of step ``final`` exists, then
    `ndde resume` it. Returns the path of the checkpoint of step ``final``."""
    ckpt = lambda s: pathlib.Path(run_dir) / "checkpoints" / f"step_{s:08d}.h5"
    proc = start_train(job, run_dir, {"NDDE_TEST_PAUSE_AT_STEP": f"{step}:60"}, *extra)
    wait_for(lambda: ckpt(step - 1).exists(), proc)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not ckpt(final).exists()
    ndde("resume", run_dir)
    return ckpt(final)
