"""Both Dask workers of the embedded cluster die at once, mid-step: the nannies restart them
and the step's shards run again on them; SIGTERM to the driver, or to the whole process group
(what a terminal or a batch system may send), checkpoints the last completed step and exits
75 whatever the workers do; `ndde resume` then repeats the bits of an uninterrupted run."""

import contextlib
import os
import re
import signal
import subprocess
import time

import psutil
import pytest
from distributed import LocalCluster

from pipeline.backends import StepAbandoned
from pipeline.backends.dask_backend import STOP_GRACE_S, DaskBackend, _Patience
from tests.pipeline_helpers import BIN, assert_same_bits, ndde, tiny_job

STEPS, EVERY = 12, 2
PAUSED_STEP = 6  # its shards compute, then sleep: the window in which the workers die
SPAWNED_WORKER = "from multiprocessing.spawn import spawn_main"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with 2 shards (local: the same bits as dask) and its job."""
    tmp = tmp_path_factory.mktemp("dask-faults")
    job = tiny_job(tmp, steps=STEPS, every=EVERY)
    ndde("train", job, "--run-dir", tmp / "ref")
    return job, _ckpt(tmp / "ref", STEPS)


def _ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}.h5"


def _newest(run_dir):
    return max(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step_*.h5"))


def _start_on_dask(job, run_dir, pause_s):
    """`ndde train` on the embedded cluster (2 workers) in its own process group."""
    return subprocess.Popen([str(BIN / "ndde"), "train", str(job), "--run-dir", str(run_dir), "--backend", "dask"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True,
                            env={**os.environ, "NDDE_TEST_PAUSE_AT_STEP": f"{PAUSED_STEP}:{pause_s}"})


def _workers(proc):
    """The driver's Dask worker processes (the nannies live in the driver)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if SPAWNED_WORKER in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _in_the_paused_step(proc, run_dir, timeout=120):
    """Wait until step PAUSED_STEP - 2 is checkpointed, then until the paused step runs."""
    end = time.time() + timeout
    while not _ckpt(run_dir, PAUSED_STEP - 2).exists():
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1]}"
        assert time.time() < end, "timed out waiting for the first checkpoints"
        time.sleep(0.01)
    time.sleep(1.0)  # step PAUSED_STEP - 1 (tens of ms) is done, the paused step's shards sleep
    workers = _workers(proc)
    assert len(workers) == 2, workers
    return workers


def _finish(proc, timeout):
    """(exit code, seconds it took, stderr); the process group is killed if it hangs."""
    t = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the run hung: no exit within {timeout} s\n{err[-3000:]}")
    return proc.returncode, time.monotonic() - t, err


@contextlib.contextmanager
def _running_on_dask(job, run_dir, pause_s):
    """_start_on_dask's process; its whole process group is killed when the block ends."""
    proc = _start_on_dask(job, run_dir, pause_s)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_both_workers_killed_mid_step_are_restarted_and_the_step_runs_again(reference, tmp_path):
    job, ref = reference
    run = tmp_path / "run"
    with _running_on_dask(job, run, pause_s=3) as proc:
        for worker in _in_the_paused_step(proc, run):
            worker.send_signal(signal.SIGKILL)
        code, took, err = _finish(proc, timeout=90)
    print(f"both workers killed: the run completed {took:.1f} s later")
    assert code == 0, err[-3000:]
    assert_same_bits(_ckpt(run, STEPS), ref)


@pytest.mark.slow
def test_sigterm_to_the_driver_whose_workers_died_checkpoints_and_exits_75(reference, tmp_path):
    job, ref = reference
    run = tmp_path / "run"
    with _running_on_dask(job, run, pause_s=60) as proc:
        for worker in _in_the_paused_step(proc, run):
            worker.send_signal(signal.SIGKILL)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code, took, err = _finish(proc, timeout=STOP_GRACE_S + 30)
    print(f"SIGTERM to the driver of dead workers: exit {code} {took:.1f} s later")
    assert code == 75, err[-3000:]
    last = PAUSED_STEP - 1  # not a multiple of checkpoint.every: written because the run stopped
    assert f"SIGTERM received: step {PAUSED_STEP} abandoned" in err and f"checkpointed step {last} to " in err, err
    assert _newest(run) == last
    ndde("resume", run)
    assert_same_bits(_ckpt(run, STEPS), ref)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_checkpoints_and_exits_75(reference, tmp_path):
    job, ref = reference
    run = tmp_path / "run"
    with _running_on_dask(job, run, pause_s=60) as proc:
        _in_the_paused_step(proc, run)
        os.killpg(proc.pid, signal.SIGTERM)  # the driver, its nannies' worker processes, everything
        code, took, err = _finish(proc, timeout=STOP_GRACE_S + 30)
    print(f"SIGTERM to the process group: exit {code} {took:.1f} s later")
    assert code == 75, err[-3000:]
    stopped = re.search(rf"SIGTERM received: step {PAUSED_STEP} abandoned, .*checkpointed step (\d+) to ", err)
    assert stopped and int(stopped.group(1)) == _newest(run) == PAUSED_STEP - 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ndde("resume", run)
    assert_same_bits(_ckpt(run, STEPS), ref)


@pytest.mark.slow
def test_sigterm_to_the_driver_whose_workers_hang_checkpoints_and_exits_75(reference, tmp_path):
    """Stopped (SIGSTOP) workers look alive to the scheduler: the step in flight gets
    STOP_GRACE_S to finish, then the run stops as above, well inside Slurm's 30 s KillWait."""
    job, ref = reference
    run = tmp_path / "run"
    with _running_on_dask(job, run, pause_s=60) as proc:
        for worker in _in_the_paused_step(proc, run):
            worker.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        code, took, err = _finish(proc, timeout=STOP_GRACE_S + 30)
    print(f"SIGTERM to the driver of hung workers: exit {code} {took:.1f} s later")
    assert code == 75, err[-3000:]
    assert f"step {PAUSED_STEP} abandoned, it did not finish within {STOP_GRACE_S:g} s of the signal" in err, err
    assert _newest(run) == PAUSED_STEP - 1 and took < 25


def test_a_step_waits_for_workers_at_most_worker_timeout():
    patience = _Patience(worker_timeout=0.2)
    patience.check(lost=[1], live=["tcp://w0"], signal_name=None)  # a worker is up to run it again
    patience.check(lost=[0, 1], live=[], signal_name=None)
    time.sleep(0.1)
    patience.check(lost=[0, 1], live=[], signal_name=None)
    patience.check(lost=[], live=["tcp://w0"], signal_name=None)  # a worker came back: the clock restarts
    patience.check(lost=[0, 1], live=[], signal_name=None)
    time.sleep(0.25)
    with pytest.raises(StepAbandoned, match=r"no Dask worker was up to compute its shard\(s\) 0, 1 for 0.2 s "
                                            r"\(backend.worker_timeout"):
        patience.check(lost=[0, 1], live=[], signal_name=None)


def test_after_a_stop_signal_a_step_waits_only_for_shards_that_live_workers_run():
    patience = _Patience(worker_timeout=100.0)
    patience.check(lost=[], live=["tcp://w0", "tcp://w1"], signal_name="SIGTERM")  # the step may still finish
    with pytest.raises(StepAbandoned, match=r"its shard\(s\) 1 had lost their Dask worker"):
        patience.check(lost=[1], live=["tcp://w0"], signal_name="SIGTERM")
    patience.signal_at -= STOP_GRACE_S + 1  # as if the signal came that long ago
    with pytest.raises(StepAbandoned, match=rf"did not finish within {STOP_GRACE_S:g} s of the signal"):
        patience.check(lost=[], live=["tcp://w0", "tcp://w1"], signal_name="SIGUSR1")


def test_a_scheduler_without_workers_is_an_error_after_worker_timeout(tmp_path):
    text = tiny_job(tmp_path).read_text().replace("[backend]", "[backend]\nworker_timeout = 1")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        t = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"fewer than 1 Dask worker\(s\) joined the scheduler at "
                                               rf"{cluster.scheduler_address} within 1 s: start workers for it"):
            DaskBackend(text, str(tmp_path / "unused.h5"), workers=2, scheduler=cluster.scheduler_address)
        assert time.monotonic() - t < 10


@pytest.mark.slow
def test_a_shard_that_kills_every_worker_it_runs_on_ends_with_a_checkpoint(reference, tmp_path):
    """The scheduler gives such a task up (KilledWorker, after allowed-failures + 1 deaths): the
    step is abandoned, the step before it checkpointed, exit 75, no traceback."""
    job, _ = reference
    run = tmp_path / "run"
    result = ndde("train", job, "--run-dir", run, "--backend", "dask", check=False, timeout=300,
                  env={"NDDE_TEST_KILL_WORKER": "3:always", "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    assert result.returncode == 75 and "Traceback" not in result.stderr, result.stderr
    assert "step 3 abandoned, shard 1's task was running on every worker that died" in result.stderr
    assert _newest(run) == 2
