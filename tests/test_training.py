"""Training runs for real: local, Dask (LocalCluster worker processes) and `mpiexec -n 2`
agree; SIGKILL at any moment then `ndde resume` repeats the bits of an uninterrupted run;
broken checkpoints, changed jobs, NaN and solver failures are handled as documented."""

import json
import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from tests.pipeline_helpers import (
    BIN,
    ROOT,
    assert_same_bits,
    ndde,
    sigkill_mid_step_then_resume,
    start_train,
    tiny_job,
    wait_for,
)

STEPS, EVERY = 12, 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The uninterrupted reference run (local backend, 2 shards) and the data it used."""
    tmp = tmp_path_factory.mktemp("train")
    job = tiny_job(tmp, steps=STEPS, every=EVERY)
    ndde("train", job, "--run-dir", tmp / "ref")
    return tmp, job, tmp / "ref" / "checkpoints"


def _ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}.h5"


def test_reference_run_learns_and_records_metrics(shared):
    tmp, job, ref = shared
    assert sorted(p.name for p in ref.iterdir()) == [f"step_{s:08d}.h5" for s in (8, 10, 12)]
    with h5py.File(ref / "step_00000012.h5") as f:
        loss = f["metrics/loss"][...]
        assert loss.shape == (STEPS,) and f["metrics/loss_per_shard"].shape == (STEPS, 2)
        assert np.all(f["metrics/solver_steps"][...] > 0) and np.all(f["metrics/rhs_evals"][...] > 0)
        assert np.all(f["metrics/wall_time"][...] > 0) and np.all(np.isfinite(f["metrics/grad_norm"][...]))
        assert f.attrs["step"] == STEPS and f.attrs["shards"] == 2 and "[model]" in f.attrs["config"]
        np.testing.assert_allclose(f["metrics/loss"][...],
                                   f["metrics/loss_per_shard"][...].sum(axis=1) / 4, rtol=1e-14)
    assert np.mean(loss[-3:]) < np.mean(loss[:3])


@pytest.mark.slow
def test_dask_with_a_killed_worker_and_mpi_match_local(shared, tmp_path):
    tmp, job, ref = shared
    marker = tmp_path / "killed"
    ndde("train", job, "--run-dir", tmp_path / "dask", "--backend", "dask",
         env={"NDDE_TEST_KILL_WORKER": f"5:{marker}"})
    assert marker.exists(), "the fault injection did not kill a worker"
    assert_same_bits(_ckpt(tmp_path / "dask", STEPS), ref / "step_00000012.h5")
    ndde("train", job, "--run-dir", tmp_path / "mpi", "--backend", "mpi", mpi_ranks=2)
    assert_same_bits(_ckpt(tmp_path / "mpi", STEPS), ref / "step_00000012.h5")



@pytest.mark.slow
def test_sigkill_during_a_step_then_resume_is_bit_identical(shared, tmp_path):
    tmp, job, ref = shared
    run = tmp_path / "run"
    sigkill_mid_step_then_resume(job, run, 5, STEPS)
    assert_same_bits(_ckpt(run, STEPS), ref / "step_00000012.h5")
    with h5py.File(_ckpt(run, STEPS)) as a, h5py.File(ref / "step_00000012.h5") as b:
        np.testing.assert_array_equal(a["metrics/loss"][...], b["metrics/loss"][...])


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(shared, tmp_path):
    tmp, job, ref = shared
    run = tmp_path / "run"
    proc = start_train(job, run, env={"NDDE_TEST_PAUSE_BEFORE_RENAME": "30"})
    tmp_file = run / "checkpoints" / "step_00000002.h5.tmp"
    wait_for(tmp_file.exists, proc)
    time.sleep(0.5)  # the file is written and fsynced; the process sleeps before the rename
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not _ckpt(run, 2).exists() and tmp_file.exists()
    result = ndde("resume", run)
    assert "starting from step 0" in result.stderr
    assert_same_bits(_ckpt(run, STEPS), ref / "step_00000012.h5")


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped(shared, tmp_path):
    tmp, job, ref = shared
    run = tmp_path / "run"
    ndde("train", job, "--run-dir", run, "--steps", "10")
    newest = _ckpt(run, 10)
    newest.write_bytes(newest.read_bytes()[:2000])
    result = ndde("resume", run, "--steps", str(STEPS))
    assert "step_00000010.h5" in result.stderr and "skipping" in result.stderr
    assert_same_bits(_ckpt(run, STEPS), ref / "step_00000012.h5")


def test_resume_of_a_finished_run_reports_its_step_and_refuses_to_go_back(shared):
    """`ndde resume RUN --steps 10` of a run at step 12 printed "step": 10 and no checkpoint,
    having done nothing; going back is now refused, and a run already at its end says where it is."""
    tmp, job, ref = shared
    summary = json.loads(ndde("resume", tmp / "ref").stdout.strip().splitlines()[-1])
    assert (summary["step"], summary["steps_run"], summary["checkpoint"]) == (STEPS, 0, str(ref / "step_00000012.h5"))
    back = ndde("resume", tmp / "ref", "--steps", "10", check=False)
    assert back.returncode == 2 and "is at step 12 already" in back.stderr and "give --steps above 12" in back.stderr
    assert sorted(p.name for p in ref.iterdir()) == [f"step_{s:08d}.h5" for s in (8, 10, 12)]


@pytest.mark.slow
def test_a_failed_step_of_a_delay_model_names_tau_and_the_job_key(tmp_path):
    """A learning rate that throws τ far out (25 on [0, 10] after one SGD step here) filled the
    history buffer; the message said to raise solve()'s history_size and nothing of τ. `ndde
    report` of that run then ended in a traceback; it now draws the rest and names the failure."""
    data = tmp_path / "mg.h5"
    sets = [f'data.path="{data}"', "data.n_train=8", "data.n_test=2", "train.batch_size=4", "model.hidden=[8]",
            'optimizer.name="sgd"', "optimizer.learning_rate=1.0", "optimizer.clip_norm=0.0", "checkpoint.every=1"]
    args = [a for s in sets for a in ("--set", s)]
    result = ndde("train", ROOT / "jobs" / "ndde_mackey_glass.toml", "--run-dir", tmp_path / "run", "--steps", "4",
                  *args, check=False)
    assert result.returncode == 3, result.stderr
    # here the history buffer fills (solver.history_size, solver.checkpoints); the step budget
    # (solver.max_steps, ...) would be as good an outcome of such a τ
    assert re.search(r"step \d failed at tau = [0-9.e+-]+: shard 0: .*ndde: .*\(in the job: "
                     r"solver\.(history_size|max_steps)", result.stderr), result.stderr
    report = ndde("report", tmp_path / "run")
    assert "; no held-out fit: ndde: " in report.stdout and (tmp_path / "run" / "report.png").stat().st_size > 10_000


def test_a_solver_message_names_the_job_keys_behind_its_advice():
    """A float32 job at rtol 1e-12: the step budget runs out, and the line a job's user reads
    names the keys to change, solver.dtype for the advice to solve in float64 included."""
    import equinox as eqx
    import jax.numpy as jnp

    import solvers as sv
    from pipeline.shard import error_line

    prob = sv.ODEProblem(lambda t, x, p: -x, jnp.ones(2, jnp.float32), 0.0, 1.0)
    with pytest.raises(eqx.EquinoxRuntimeError) as err:
        sv.solve(prob, None, rtol=1e-12, atol=1e-14, max_steps=50)
    line = error_line(err.value)
    assert line.startswith("ndde: step budget exhausted: max_steps=50 ")
    assert line.endswith("(in the job: solver.max_steps, solver.rtol, solver.atol, solver.dtype).")


def test_resume_past_a_cosine_schedules_end_is_refused(shared, tmp_path):
    """The cosine schedule is laid out over train.steps and is 0 after it: `ndde resume --steps`
    past it ran its steps without changing a parameter (the README suggested it for the demo)."""
    tmp, job, ref = shared
    run = tmp_path / "run"
    ndde("train", job, "--run-dir", run, "--steps", "2", "--set", 'optimizer.schedule="cosine"')
    result = ndde("resume", run, "--steps", "4", check=False)
    assert result.returncode == 2, result.stderr
    assert "the cosine schedule's learning rate is 0 after step 2" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.h5"]


def test_a_float32_job_trains_on_data_it_generates_and_resumes(tmp_path):
    """solver.dtype = "float32": generating the data switched the process to float64, the
    network's weights then came out float64 and the first step failed ('unravel function given
    array of dtype float32, but expected dtype float64')."""
    job, run = tiny_job(tmp_path, steps=4, every=2), tmp_path / "run"
    assert not (tmp_path / "tiny.h5").exists()
    ndde("train", job, "--run-dir", run, "--steps", "2", "--set", 'solver.dtype="float32"')
    ndde("resume", run, "--steps", "4")
    with h5py.File(_ckpt(run, 4)) as f:
        names = _datasets(f["params"]) + _datasets(f["opt_state"])
        floats = {n: f[n].dtype for n in names if f[n].dtype.kind == "f"}
        assert floats and set(floats.values()) == {np.dtype(np.float32)}, floats
        assert np.all(np.isfinite(f["metrics/loss"][...])) and f.attrs["step"] == 4


def _datasets(group):
    names = []
    group.visititems(lambda n, o: names.append(f"{group.name}/{n}") if isinstance(o, h5py.Dataset) else None)
    return names


@pytest.mark.slow
def test_resume_refuses_a_changed_model_or_data(shared, tmp_path):
    tmp, job, ref = shared
    run = tmp_path / "run"
    ndde("train", job, "--run-dir", run, "--steps", "2")
    original = (run / "job.toml").read_text()
    (run / "job.toml").write_text(original.replace("hidden = [8]", "hidden = [6]"))
    result = ndde("resume", run, check=False)
    assert result.returncode == 2 and "model.hidden: (8,) -> (6,)" in result.stderr
    (run / "job.toml").write_text(original.replace("batch_size = 4", "batch_size = 2"))
    result = ndde("resume", run, check=False)
    assert result.returncode == 2 and "train.batch_size" in result.stderr
    (run / "job.toml").write_text(original)
    ndde("resume", run, "--steps", "3")
    assert _ckpt(run, 3).exists()
    result = ndde("train", job, "--run-dir", run, check=False)
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr


def test_resume_refuses_changed_data(shared, tmp_path):
    tmp, job, ref = shared
    run, own = tmp_path / "run", tmp_path / "own.h5"
    ndde("train", job, "--run-dir", run, "--steps", "2", "--set", f'data.path="{own}"')
    with h5py.File(own, "r+") as f:
        f["ys"][0, 1, 0] += 1e-3
    result = ndde("resume", run, check=False)
    assert result.returncode == 2 and f"the contents of {own} changed" in result.stderr


@pytest.mark.slow
def test_nan_gradient_stops_naming_the_step_and_keeps_good_checkpoints(shared, tmp_path):
    tmp, job, ref = shared
    run = tmp_path / "run"
    env = {"NDDE_TEST_NAN_AT_STEP": "3"}
    result = ndde("train", job, "--run-dir", run, "--steps", "5", "--set", "checkpoint.every=1",
                  env=env, check=False)
    assert result.returncode == 3 and "step 3 failed: non-finite gradient" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.h5", "step_00000002.h5"]
    assert_same_bits(_ckpt(run, 2), _ckpt(run, 2))  # intact
    skip = tmp_path / "skip"
    result = ndde("train", job, "--run-dir", skip, "--steps", "4", "--set", "checkpoint.every=1",
                  "--set", 'train.on_nonfinite="skip"', env=env)
    assert "step 3 skipped, its update not applied: non-finite gradient" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["steps_skipped"] == 1
    with h5py.File(_ckpt(skip, 4)) as f:
        assert f["metrics/skipped"][...].tolist() == [False, False, True, False]
    assert_same_bits(_ckpt(skip, 2), _ckpt(skip, 3))  # step 3 applied nothing


def test_an_error_every_mpi_rank_raises_is_printed_once(shared, tmp_path):
    """3 ranks for a batch of 4 printed the same ConfigError three times, naming backend.workers,
    which the job did not set (the rank count replaces it); a bad job file, once per rank too."""
    tmp, job, ref = shared
    result = ndde("train", job, "--run-dir", tmp_path / "run", "--backend", "mpi", mpi_ranks=3, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: train.batch_size 4 must be a multiple of backend.workers 3") == 1, result.stderr
    assert "(under MPI, backend.workers is the number of ranks)" in result.stderr
    # an error in the job itself comes before MPI starts (rank 0 is known from mpiexec's PMI_RANK)
    result = ndde("train", job, "--run-dir", tmp_path / "run", "--backend", "mpi", "--set", 'data.system="mackey_glass"',
                  mpi_ranks=2, check=False)
    assert result.returncode == 2 and result.stderr.count("does not fit model.kind 'hnn'") == 1, result.stderr


def test_solver_failure_stops_with_its_message(shared, tmp_path):
    tmp, job, ref = shared
    result = ndde("train", job, "--run-dir", tmp_path / "run", "--set", "solver.max_steps=2", check=False)
    assert result.returncode == 3
    assert "step 1 failed" in result.stderr and "step budget exhausted" in result.stderr
    assert "(in the job: solver.max_steps, solver.rtol, solver.atol)" in result.stderr  # not only solve()'s names
    mpi = ndde("train", job, "--run-dir", tmp_path / "mpi", "--backend", "mpi", "--set", "solver.max_steps=2",
               mpi_ranks=2, check=False)
    assert mpi.returncode == 3 and mpi.stderr.count("step 1 failed") == 1, mpi.stderr  # said once, not per rank
    # skipping failed steps stops all the same once train.max_skips_in_a_row fail one after another
    run = tmp_path / "skip"
    result = ndde("train", job, "--run-dir", run, "--set", "solver.max_steps=2", "--set", 'train.on_nonfinite="skip"',
                  "--set", "train.max_skips_in_a_row=2", "--set", "checkpoint.every=1", check=False)
    assert result.returncode == 3, result.stderr
    assert "step 1 skipped, its update not applied: shard 0" in result.stderr
    assert "steps 1..2 failed in a row (train.max_skips_in_a_row = 2), the last: shard 0" in result.stderr
    assert "step budget exhausted" in result.stderr and "the newest checkpoint is step 1" in result.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001.h5"]  # step 1: nothing applied


def test_the_training_step_is_kept_in_the_persistent_compilation_cache(shared, tmp_path):
    """The step solves with throw=False, so it holds no host callback and JAX's persistent cache
    stores it: a resumed, requeued or second worker process loads it instead of compiling."""
    tmp, job, ref = shared
    cache = tmp_path / "jax-cache"
    ndde("train", job, "--run-dir", tmp_path / "run", "--steps", "2", env={"JAX_COMPILATION_CACHE_DIR": str(cache)})
    names = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("jit_shard_loss-") for n in names), names


def test_report_and_inspect(shared):
    tmp, job, ref = shared
    run = ref.parent
    out = ndde("report", run).stdout
    png = run / "report.png"
    assert "held-out MSE" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = ndde("inspect", ref / "step_00000012.h5").stdout
    assert "sha256 verifies" in text and "params/H/0/w: float64 [2, 8]" in text and "@step = 12" in text
    for path, what in ((ref / "step_00000099.h5", "does not exist"), (ref, "is a directory, not a file")):
        result = ndde("inspect", path, check=False)
        assert result.returncode == 2 and f"{path} {what}: give a checkpoint" in result.stderr, result.stderr


def test_report_refuses_to_fit_against_changed_or_missing_data(tmp_path):
    """The held-out fit was drawn against whatever the data file held by then (regenerated with
    another noise, say) without a word, and a missing file ended in h5py's errno text."""
    job = tiny_job(tmp_path, steps=2, data=tmp_path / "d.h5")
    ndde("train", job, "--run-dir", tmp_path / "run")
    assert "held-out MSE" in ndde("report", tmp_path / "run").stdout
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f["ys"][-1] = f["ys"][-1] + 1e-3  # a held-out row
    out = ndde("report", tmp_path / "run").stdout
    assert f"no held-out fit: the contents of {tmp_path / 'd.h5'} changed since step_00000002.h5" in out, out
    (tmp_path / "d.h5").unlink()
    result = ndde("report", tmp_path / "run", check=False)
    assert result.returncode == 2 and f"data file {tmp_path / 'd.h5'} does not exist" in result.stderr


@pytest.mark.slow
def test_gradcheck_methods_agree_with_finite_differences(shared):
    tmp, job, ref = shared
    out = ndde("gradcheck", job).stdout
    worst = float(out.strip().splitlines()[-1].split()[-1])
    assert worst < 1e-6, out
    for method in ("Backprop", "ForwardMode", "BacksolveAdjoint", "InterpolatingAdjoint", "finite"):
        assert method in out


@pytest.mark.parametrize("command", ["train", "resume", "data", "report", "inspect", "gradcheck"])
def test_help(command):
    assert "usage: ndde " + command in ndde(command, "--help").stdout


@pytest.mark.slow
def test_dask_with_an_existing_scheduler(shared, tmp_path):
    from distributed import LocalCluster

    tmp, job, ref = shared
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        ndde("train", job, "--run-dir", tmp_path / "run", "--backend", "dask", "--scheduler", cluster.scheduler_address)
    assert_same_bits(_ckpt(tmp_path / "run", STEPS), ref / "step_00000012.h5")


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_75(shared, tmp_path):
    tmp, job, ref = shared
    run = tmp_path / "run"
    proc = start_train(job, run)
    wait_for(lambda: _ckpt(run, 2).exists(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    assert "SIGTERM received: checkpointed step" in proc.stderr.read().decode()
    newest = max(int(p.name[5:13]) for p in (run / "checkpoints").glob("step_*.h5"))
    assert 2 <= newest < STEPS
    ndde("resume", run)
    assert_same_bits(_ckpt(run, STEPS), ref / "step_00000012.h5")


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_current_step_and_exits_130(shared, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group: the driver and, with the
    embedded Dask cluster, its worker processes. It used to end in a KeyboardInterrupt traceback
    with up to checkpoint.every - 1 steps lost (and the workers died mid-step, leaving the
    driver waiting for them). Now the workers ignore it and the driver finishes its step,
    checkpoints it and exits 130 (not 75: the batch script must not requeue)."""
    tmp, job, ref = shared
    run = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "ndde"), "train", str(job), "--run-dir", str(run), "--backend", "dask"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: _ckpt(run, 2).exists(), proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read().decode()
    stopped = re.search(r"SIGINT received: checkpointed step (\d+) to ", err)
    assert stopped and "Ctrl-C: finishing this step" in err and "Traceback" not in err, err
    assert max(int(p.name[5:13]) for p in (run / "checkpoints").glob("step_*.h5")) == int(stopped.group(1)) < STEPS
    ndde("resume", run)
    assert_same_bits(_ckpt(run, STEPS), ref / "step_00000012.h5")


@pytest.mark.slow
def test_a_run_directory_trains_in_one_process_at_a_time(shared, tmp_path):
    """`ndde resume` of a run that is still training used to train the same steps again and
    write over its checkpoints; now it is refused, naming the holder, whom `ndde status` names too. The lock
    goes with its process, however it ends (SIGKILL here)."""
    tmp, job, ref = shared
    run = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "ndde"), "train", str(job), "--run-dir", str(run), "--steps", "1000000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _ckpt(run, 2).exists(), proc)
        result = ndde("resume", run, check=False, timeout=120)  # without the lock: trains to step 1000000
        assert result.returncode == 2 and f"{run} is in use: pid {proc.pid} on " in result.stderr, result.stderr
        assert f"training now: pid {proc.pid} on " in ndde("status", run).stdout
    finally:
        proc.kill()
        proc.wait()
    assert "not training now (no process holds " in ndde("status", run).stdout
    newest = max(int(p.name[5:13]) for p in (run / "checkpoints").glob("step_*.h5"))
    assert json.loads(ndde("resume", run, "--steps", str(newest + 1)).stdout)["step"] == newest + 1


def test_progress_bar_is_quiet_without_a_tty(shared, tmp_path):
    tmp, job, ref = shared
    result = ndde("train", job, "--run-dir", tmp_path / "run", "--steps", "2")
    assert "step/s" not in result.stderr and "it/s" not in result.stderr


def test_a_shards_step_gradient_is_the_same_for_every_method(tmp_path):
    """The step's gradient, a shard's jitted value_and_grad of the vmapped sum of its trajectories'
    losses solved with throw=False, at the tiny job's initial parameters. "backprop" and
    "forward" differentiate the same discrete solution, "interpolating" differs from them by
    the tolerance. Backprop's was 4x (the shard's 4 trajectories) the others', its NaN check
    having broadcast the shared parameters' cotangent over the batch; every pipeline test that
    compares runs with each other trained with it unnoticed."""
    from jax.flatten_util import ravel_pytree

    from pipeline import config, data
    from pipeline.models import init_params
    from pipeline.shard import ShardWorker

    grads = {}
    for sensitivity in ("backprop", "forward", "interpolating"):
        job = config.load(tiny_job(tmp_path, sensitivity=sensitivity, name=f"{sensitivity}.toml"))
        path = data.ensure(job)
        flat = np.asarray(ravel_pytree(init_params(job))[0])
        result = ShardWorker(job.to_toml(), str(path), 0, 1).compute(flat, 1)
        assert result.error == "" and np.all(np.isfinite(result.grad_sum)), result.error
        grads[sensitivity] = result.grad_sum
    scale = np.max(np.abs(grads["forward"]))
    np.testing.assert_allclose(grads["backprop"], grads["forward"], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(grads["interpolating"], grads["forward"], rtol=0, atol=1e-4 * scale)
