"""Nothing a user or a cluster does loses a checkpoint, hangs a run or changes it silently:
rotation keeps what verifies, refused commands write nothing, FIFOs are not opened, failed
steps in a row survive a resume, sweeps and slurm.extra cannot break the batch script's promise,
and bad inputs end in one line and exit 2."""

import contextlib
import fcntl
import io
import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import types

import h5py
import numpy as np
import pytest

from pipeline import cli, config, data, submit
from pipeline.checkpoint import CheckpointError, CheckpointManager, contents_digest, read_attrs
from tests.pipeline_helpers import BIN, ROOT, ndde, tiny_job
from tests.test_checkpoint import _save


def _names(directory):
    return sorted(p.name for p in pathlib.Path(directory).iterdir())


# 1. rotation --------------------------------------------------------------------------------

def test_rotation_keeps_the_newest_files_that_verify_and_leaves_broken_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4):
        _save(manager, step)
    (tmp_path / "step_00000099.h5").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"step_00000099.h5 \(unreadable"):
        _save(manager, 6)
    assert _names(tmp_path) == ["step_00000004.h5", "step_00000006.h5", "step_00000099.h5"]
    assert manager.verify(4) is None and manager.verify(6) is None


def test_rotation_never_deletes_the_file_just_written(tmp_path):
    """keep = 1 and a broken newest file: a run that starts over writes step 2 and keeps it."""
    manager = CheckpointManager(tmp_path, keep=1)
    (tmp_path / "step_00000010.h5").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_00000010.h5"):
        written = _save(manager, 2)
    assert written.exists() and manager.verify(2) is None
    with pytest.warns(UserWarning, match="step_00000010.h5"):
        _save(manager, 3)
    assert _names(tmp_path) == ["step_00000003.h5", "step_00000010.h5"]


@pytest.mark.slow
def test_resume_past_a_garbage_checkpoint_keeps_the_one_it_names(tmp_path):
    job = tiny_job(tmp_path, steps=8, every=2)
    run = tmp_path / "r1"
    ndde("train", job, "--run-dir", run, "--set", "checkpoint.keep=1", "--steps", "4")
    (run / "checkpoints" / "step_00000099.h5").write_text("garbage")
    result = ndde("resume", run, "--steps", "8")
    summary = json.loads(result.stdout.splitlines()[-1])
    assert pathlib.Path(summary["checkpoint"]).name == "step_00000008.h5"
    assert _names(run / "checkpoints") == ["step_00000008.h5", "step_00000099.h5"]
    assert CheckpointManager(run / "checkpoints").verify(8) is None


# 7. FIFOs -----------------------------------------------------------------------------------

def _returns_within(fn, seconds=20):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except Exception as err:  # re-raised in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} blocked for {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_fifo_named_like_a_checkpoint_is_skipped_not_opened(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    _save(manager, 2)
    os.mkfifo(tmp_path / "step_00000010.h5")
    with pytest.warns(UserWarning, match="step_00000010.h5: is a FIFO, not a regular file"):
        assert _returns_within(manager.latest_valid_step) == 2
    with pytest.warns(UserWarning, match=r"not rotated, as they do not verify: step_00000010.h5 \(is a FIFO"):
        _save(manager, 4)  # rotation does not open it either
    assert "step_00000010.h5" in _names(tmp_path)


def test_restore_and_read_attrs_refuse_a_fifo_without_opening_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    os.mkfifo(tmp_path / "step_00000003.h5")
    with pytest.raises(CheckpointError, match="step_00000003.h5 is a FIFO, not a regular file"):
        _returns_within(lambda: manager.restore(3, {}, {}))
    with pytest.raises(CheckpointError, match="is a FIFO"):
        _returns_within(lambda: read_attrs(tmp_path / "step_00000003.h5"))


def test_status_and_resume_do_not_block_on_a_fifo(tmp_path):
    job = tiny_job(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.toml").write_text(job.read_text())
    (run / "checkpoints").mkdir()
    os.mkfifo(run / "checkpoints" / "step_00000010.h5")
    status = ndde("status", run, timeout=60)
    assert "newest checkpoint: none" in status.stdout and "is a FIFO" in status.stderr


# 3. path-safe names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "..", ".hidden", "-rf", "a/b", "x" * 129])
def test_names_that_are_not_path_safe_are_refused(name):
    with pytest.raises(config.ConfigError, match="name must be 1 to 128 letters"):
        config.from_dict({"name": name})


def test_a_job_named_dot_dot_writes_nothing(tmp_path):
    (tmp_path / "job.toml").write_text(tiny_job(tmp_path, name="tiny.toml").read_text()
                                       .replace('name = "tiny_hnn"', 'name = ".."'))
    before = _names(tmp_path)
    with contextlib.chdir(tmp_path):
        result = _main("train", tmp_path / "job.toml")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "name must be" in result.stderr
    assert _names(tmp_path) == before


# 2 and 4. submit and train check everything before they write --------------------------------

def _submit(tmp_path, run_dir, *more):
    return _main("submit", tiny_job(tmp_path), "--run-dir", run_dir, "--backend", "dask", "--dry-run", *more)


def test_a_dry_run_submit_into_a_training_run_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = submit.apply_flags(config.load(tiny_job(tmp_path)), backend="dask")
    (run / "job.toml").write_text(job.to_toml())
    with open(run / ".lock", "a+") as lock:  # a live run holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for more in (["--set", "optimizer.learning_rate=0.5"], []):  # its own job too: one trainer at a time
            result = _submit(tmp_path, run, *more)
            assert result.returncode == 2 and "is training now (" in result.stderr, result.stderr
    assert (run / "job.toml").read_text() == job.to_toml() and _names(run) == [".lock", "job.toml"]


def test_a_submit_into_a_run_with_checkpoints_or_a_queued_job_must_be_its_job(tmp_path):
    run = tmp_path / "run"
    _save(CheckpointManager(run / "checkpoints"), 2)
    (run / "job.toml").write_text(config.load(tiny_job(tmp_path)).to_toml())  # backend local
    result = _submit(tmp_path, run)
    assert result.returncode == 2 and "holds checkpoints (newest: step 2) under another job" in result.stderr
    assert "backend.kind: 'local' -> 'dask'" in result.stderr
    queued = tmp_path / "queued"
    queued.mkdir()
    job = submit.apply_flags(config.load(tiny_job(tmp_path)), backend="dask")
    (queued / "job.toml").write_text(job.to_toml())
    (queued / "slurm_job_id").write_text("17\n")
    result = _submit(tmp_path, queued, "--set", "optimizer.learning_rate=0.5")
    assert result.returncode == 2 and "was submitted before (slurm_job_id) under another job" in result.stderr
    assert "optimizer.learning_rate: 0.01 -> 0.5" in result.stderr
    longer = _submit(tmp_path, queued, "--time", "05:00:00")  # [slurm] may change: the run stays the same
    assert longer.returncode == 0 and "#SBATCH --time=05:00:00" in longer.stdout
    assert (queued / "job.toml").read_text() == job.to_toml()


@pytest.mark.parametrize("bad", ["a\nb", 'a"b', "a\rb"])
def test_a_refused_submit_writes_nothing(tmp_path, bad):
    result = _submit(tmp_path, tmp_path / "runs" / bad)
    assert result.returncode == 2 and "cannot go into an #SBATCH line" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_train_refused_for_its_data_leaves_no_run_directory(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    job = tiny_job(tmp_path, data=bad)
    result = ndde("train", job, "--run-dir", tmp_path / "run", check=False)
    assert result.returncode == 2 and "is not a readable HDF5 file" in result.stderr
    assert not (tmp_path / "run").exists()
    result = _main("train", job, "--run-dir", tmp_path / "run2", "--dry-run")
    assert result.returncode == 2 and "is not a readable HDF5 file" in result.stderr
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_a_data_error_under_mpi_reaches_every_rank(tmp_path):
    """Rank 0 refused the data file and never reached the barrier the other ranks waited in."""
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    result = ndde("train", tiny_job(tmp_path, data=bad), "--run-dir", tmp_path / "run", "--backend", "mpi",
                  mpi_ranks=2, check=False, timeout=120)
    assert result.returncode == 2 and result.stderr.count("is not a readable HDF5 file") == 1, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_train_that_cannot_reach_its_scheduler_leaves_no_run_directory(tmp_path):
    job = tiny_job(tmp_path)
    ndde("data", job)
    result = ndde("train", job, "--run-dir", tmp_path / "run", "--backend", "dask", "--scheduler",
                  "tcp://127.0.0.1:9", check=False, timeout=300, env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    assert result.returncode != 0 and not (tmp_path / "run").exists(), result.stderr
    (tmp_path / "empty").mkdir()  # a directory made for the run: left as it was, empty
    result = ndde("train", job, "--run-dir", tmp_path / "empty", "--backend", "dask", "--scheduler",
                  "tcp://127.0.0.1:9", check=False, timeout=300, env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    assert result.returncode != 0 and _names(tmp_path / "empty") == [], result.stderr


# 8. failed steps in a row carry over a resume ----------------------------------------------

@pytest.mark.slow
def test_failed_steps_in_a_row_are_counted_across_a_resume(tmp_path):
    job = tiny_job(tmp_path, steps=8, every=1)
    run = tmp_path / "run"
    first = ndde("train", job, "--run-dir", run, "--steps", "2", "--set", "solver.max_steps=2",
                 "--set", 'train.on_nonfinite="skip"', "--set", "train.max_skips_in_a_row=3")
    assert json.loads(first.stdout.splitlines()[-1])["loss"] is None  # NaN is no JSON: null
    result = ndde("resume", run, "--steps", "8", check=False)
    assert result.returncode == 3, result.stderr
    assert "steps 1..3 failed in a row (train.max_skips_in_a_row = 3)" in result.stderr


# 9 and 10. Slurm ----------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [["slurm.partition=a,b"], ["slurm.gpus_per_node=0,2"], ["backend.kind=dask,mpi"],
                                  ["optimizer.learning_rate=1e-3,1e-2", "slurm.time=00:10:00,00:20:00"]])
def test_a_sweep_whose_points_differ_in_slurm_or_backend_is_refused(tmp_path, grid):
    job = ROOT / "jobs" / "delayed_gradient.toml"
    flags = {} if grid[0].startswith("backend.kind") else {"backend": "mpi"}
    with pytest.raises(config.ConfigError, match=r"a sweep is one Slurm job array.*changes (slurm|backend)\."):
        submit.sweep(job, grid, tmp_path / "sw", flags=flags)
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("option", ["--no-requeue", "--signal=B:KILL@1", "--export=ALL,PATH=/tmp", "--chdir=/tmp",
                                    "--output=/tmp/x", "--wrap=id", "--no-req", "--time=9:00:00", "--array=0-3",
                                    "--open-mode=truncate", "--error=/tmp/e"])
def test_slurm_extra_that_breaks_the_script_is_refused(option):
    with pytest.raises(config.ConfigError, match=r"slurm\.extra .* conflicts with --"):
        config.from_dict({"slurm": {"extra": [option]}})


def test_slurm_extra_that_leaves_the_script_alone_is_kept():
    kept = ("--constraint=a100", "--exclusive", "--mail-type=END", "--gpus=4")  # --gpus: an option of its own
    assert config.from_dict({"slurm": {"extra": list(kept)}}).slurm.extra == kept


@pytest.mark.parametrize("time, grace, ok", [("00:10:00", 599, True), ("00:10:00", 600, False), ("2", 120, False),
                                             ("1-00", 65535, True), ("0", 65535, True)])
def test_signal_grace_stays_below_the_time_limit(time, grace, ok):
    raw = {"slurm": {"time": time, "signal_grace": grace}}
    if ok:
        assert config.from_dict(raw).slurm.signal_grace == grace
    else:
        with pytest.raises(config.ConfigError, match="slurm.signal_grace .* must be below the time limit"):
            config.from_dict(raw)
    with pytest.raises(config.ConfigError, match="slurm.signal_grace must be <= 65535"):
        config.from_dict({"slurm": {"time": "0", "signal_grace": 65536}})


def test_the_script_calls_scontrol_and_hostname_by_the_paths_found_at_submit_time():
    found = submit.tools()
    script = submit.render_sbatch(config.from_dict({}), ["/r"], "/r/o", "/b/ndde", **found)
    assert f"if {found['scontrol']} requeue" in script and f"on $({found['hostname']})" in script
    assert pathlib.Path(found["hostname"]).is_absolute()  # coreutils' hostname is on every machine


# 11. one line, not a traceback ---------------------------------------------------------------

def _main(*args):
    """`ndde ARGS` in this process: (returncode, stdout, stderr) like a subprocess's."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's refusals
            rc = exit_.code
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def _one_line_error(result, command, text):
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"ndde {command}: error:"), result.stderr
    assert text in result.stderr, result.stderr


@pytest.mark.parametrize("contents, text", [
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
    (b"name = 'x'\n[model]\nhidden = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests arrays or tables too deeply"),
    (b"[data]\nt1 = 1" + b"0" * 400 + b"\n", "data.t1 must be a finite float, got an integer of 401 digits"),
    (b"[train]\nseed = 18446744073709551616\n", "train.seed must be <= 4294967295"),
    (b"[data]\nn_train = 1000000000000\n", "data.n_train must be <= 2147483647"),
    (b"[solver]\nmax_steps = 4611686018427387904\n", "solver.max_steps must be <= 2147483647"),
])
def test_bad_job_files_end_in_one_line(tmp_path, contents, text):
    (tmp_path / "job.toml").write_bytes(contents)
    _one_line_error(_main("train", tmp_path / "job.toml", "--dry-run"), "train", text)


@pytest.mark.parametrize("flags", [["--steps", "-1"], ["--steps", "0"], ["--workers", "0"]])
def test_step_and_worker_counts_must_be_positive(tmp_path, flags):
    job = tiny_job(tmp_path)
    for command, target in (("train", job), ("resume", tmp_path)):
        _one_line_error(_main(command, target, *flags), command, "expected a positive integer")


def _tiny(tmp_path, **data_keys):
    return config.load(tiny_job(tmp_path), [f"data.{k}={v}" for k, v in data_keys.items()])


def test_a_generator_that_cannot_reach_t1_or_overflows_writes_no_file(tmp_path):
    with pytest.raises(data.DataError, match="the pendulum solve failed for 10 of 10 trajectories .* data.t1 = 1000000000.0"):
        data.generate(_tiny(tmp_path, t1=1e9), tmp_path / "long.h5")
    with pytest.raises(data.DataError, match="data.noise = 1e.308 makes observations overflow"):
        data.generate(_tiny(tmp_path, noise=1e308), tmp_path / "noisy.h5")
    assert _names(tmp_path) == ["job.toml"]
    _one_line_error(_main("data", tiny_job(tmp_path), "--set", "data.noise=1e308", "--out", tmp_path / "n.h5"), "data",
                    "makes observations overflow to inf")
    assert _names(tmp_path) == ["job.toml"]


def _write_data(path, ys, attrs=None):
    n, t = ys.shape[:2]
    with h5py.File(path, "w") as f:
        f["ts"], f["ys"], f["x0"] = np.linspace(0.0, 1.0, t), ys, np.zeros((n, 2))
        f.attrs.update(attrs or {})


@pytest.mark.parametrize("ys, attrs, text", [
    (np.full((10, 6, 2), "1.0", dtype="S3"), None, "dataset 'ys' holds |S3 values; it must hold real numbers"),
    (np.zeros((10, 6, 2), complex), None, "dataset 'ys' holds complex128 values"),
    (np.zeros((10, 6, 2)), {"format": "ndde-data"}, "lacks the attrs system, noise, seed"),
])
def test_data_files_of_the_wrong_kind_are_named(tmp_path, ys, attrs, text):
    _write_data(tmp_path / "d.h5", ys, attrs)
    with pytest.raises(data.DataError, match=text.replace("|", r"\|").replace("(", r"\(")):
        data.validate(tmp_path / "d.h5", _tiny(tmp_path))


def test_a_directory_as_data_path_is_one_line(tmp_path):
    (tmp_path / "dir.h5").mkdir()
    job = tiny_job(tmp_path, data=tmp_path / "dir.h5")
    _one_line_error(_main("train", job, "--dry-run"), "train", "is not a regular file")


def _resign(path, edit):
    with h5py.File(path, "r+") as f:
        edit(f)
        f.attrs["sha256"] = contents_digest(f)


@pytest.mark.parametrize("edit, why", [
    (lambda f: f.attrs.__delitem__("config"), "no config attr"),
    (lambda f: f.attrs.__setitem__("config", "[[[ not toml"), "its config attr is not TOML"),
    (lambda f: f.__delitem__("params"), "no group /params"),
])
def test_a_re_signed_checkpoint_without_its_layout_does_not_verify(tmp_path, edit, why):
    manager = CheckpointManager(tmp_path)
    _save(manager, 1)
    _resign(_save(manager, 2), edit)
    assert why in manager.verify(2)
    with pytest.warns(UserWarning, match="step_00000002.h5"):
        assert manager.latest_valid_step() == 1


# 6. a signal while starting ------------------------------------------------------------------

def _catches(pid, sig) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` installed (its SigCgt mask in /proc)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_while_starting_means_requeue_without_a_checkpoint(tmp_path, sig):
    """From the moment the command line is parsed (before imports, data generation, the
    backend's start) a stop signal ends the start with exit 75 and no checkpoint: the batch
    shell requeues (an uncaught SIGUSR1 would end it with 138, no requeue)."""
    job, run = tiny_job(tmp_path), tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "ndde"), "train", str(job), "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, sig):  # the earliest moment a signal can be honoured
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    assert f"{sig.name} received while starting, before its first step" in stderr and "nothing trained, no checkpoint written" in stderr
    assert CheckpointManager(run / "checkpoints").steps() == []
    assert not (run / "job.toml").exists() or (run / "job.toml").read_text().startswith('name = "tiny_hnn"')
