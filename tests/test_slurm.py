"""Against a real single-node Slurm (slurm/local-cluster.sh): submit, preempt with USR1,
requeue, resume; dask-jobqueue workers as Slurm jobs; a failing job does not loop."""

import fcntl
import pathlib
import shutil
import subprocess
import sys
import time

import h5py
import pytest

from tests.pipeline_helpers import ROOT, assert_same_bits, ndde, tiny_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm():
    """Start the local cluster once (a file lock serialises pytest-xdist workers)."""
    with open("/tmp/ndde-slurm-start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start"], check=True, timeout=300)
    return True


def _job_info(job_id):
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def wait_done(job_id, timeout=600, on_pending_requeue=True):
    """Poll until the job (or array) has left the queue; skip the ~2 min BeginTime wait of
    a requeued job as a user of this cluster would (scontrol update StartTime=now), but not
    within 2 s of the requeue: Slurm revokes the old run's credential at the requeue, with
    1-second resolution, and a run started in that same second is killed ("Job credential
    revoked", seen once under load). A failed squeue is asked again, never read as done."""
    end = time.time() + timeout
    held_since = {}
    while time.time() < end:
        res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T %r"], capture_output=True, text=True)
        rows = [r.split() for r in res.stdout.split("\n") if r.strip()]
        if res.returncode == 0 and not rows:
            return
        for jid, state, reason in rows:
            if on_pending_requeue and state == "PENDING" and reason == "BeginTime":
                if time.time() - held_since.setdefault(jid, time.time()) >= 2.0:
                    subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], check=False)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still queued after {timeout} s")


def _submit(*args):
    out = ndde("submit", *args).stdout.strip().splitlines()
    assert out[-1].isdigit(), out
    return out[-1]


def _final(run_dir, step):
    return pathlib.Path(run_dir) / "checkpoints" / f"step_{step:08d}.h5"


def test_mpi_job_completes_with_the_parameters_of_a_local_mpi_run(slurm, tmp_path):
    sets = ["--set", f'data.path="{tmp_path / "dg.h5"}"', "--set", "data.n_train=16", "--set", "data.n_test=2",
            "--set", "train.batch_size=8", "--set", "checkpoint.every=3",
            "--set", "solver.sensitivity=\"backprop\""]  # compiles in 10 s instead of 32 s
    job = ROOT / "jobs" / "delayed_gradient.toml"
    ndde("train", job, "--run-dir", tmp_path / "local", "--backend", "mpi", "--steps", "3", *sets, mpi_ranks=2)
    job_id = _submit(job, "--run-dir", tmp_path / "slurm", "--backend", "mpi", "--ntasks-per-node", "2",
                     "--steps", "3", *sets)
    wait_done(job_id)
    log = next((tmp_path / "slurm").glob("slurm-*.out")).read_text()
    assert "training exited with code 0" in log, log
    assert_same_bits(_final(tmp_path / "slurm", 3), _final(tmp_path / "local", 3))
    with h5py.File(_final(tmp_path / "slurm", 3)) as f:
        assert f.attrs["slurm_job_id"] == int(job_id) and f.attrs["shards"] == 2
    assert "COMPLETED" in ndde("status", tmp_path / "slurm").stdout


def test_a_users_model_trains_under_slurm_from_the_run_directorys_copy(slurm, tmp_path):
    """The hutchinson example submitted with backend mpi: the queued job imports RUN_DIR/model/'s
    copy (the original is gone before the job runs) and reaches a local run's bits."""
    example = ROOT / "examples" / "hutchinson"
    for name in ("hutchinson.py", "hutchinson.toml"):
        shutil.copy(example / name, tmp_path / name)
    subprocess.run([sys.executable, str(example / "make_data.py"), str(tmp_path / "data.h5")], check=True)
    job = tmp_path / "hutchinson.toml"
    ndde("train", job, "--run-dir", tmp_path / "local", "--steps", "4")
    job_id = _submit(job, "--run-dir", tmp_path / "slurm", "--backend", "mpi", "--ntasks-per-node", "2",
                     "--steps", "4")
    (tmp_path / "hutchinson.py").unlink()
    wait_done(job_id)
    log = next((tmp_path / "slurm").glob("slurm-*.out")).read_text()
    assert "training exited with code 0" in log, log
    assert_same_bits(_final(tmp_path / "slurm", 4), _final(tmp_path / "local", 4))
    with h5py.File(_final(tmp_path / "slurm", 4)) as f:
        assert f.attrs["model_file"] == str(tmp_path / "slurm" / "model" / "hutchinson.py")


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_parameters(slurm, tmp_path):
    steps = 400
    job = tiny_job(tmp_path, steps=steps, every=5)
    ndde("train", job, "--run-dir", tmp_path / "ref")  # uninterrupted, local backend, same 2 shards
    job_id = _submit(job, "--run-dir", tmp_path / "slurm", "--backend", "mpi", "--ntasks-per-node", "2")
    ckpts = tmp_path / "slurm" / "checkpoints"
    end = time.time() + 300
    while not (ckpts.exists() and any(ckpts.glob("step_*.h5"))):
        assert time.time() < end, "no checkpoint within 300 s"
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_done(job_id)
    log = next((tmp_path / "slurm").glob("slurm-*.out")).read_text()
    assert "requeueing job" in log and "restart 1" in log and "training exited with code 0" in log, log
    with h5py.File(_final(tmp_path / "slurm", steps)) as f:
        assert f.attrs["slurm_restart_count"] >= 1 and f.attrs["slurm_job_id"] == int(job_id)
    assert _job_info(job_id).get("Restarts") == "1"
    assert_same_bits(_final(tmp_path / "slurm", steps), _final(tmp_path / "ref", steps))


def test_failing_job_reports_and_does_not_requeue(slurm, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("not an HDF5 file")
    job_id = _submit(tiny_job(tmp_path, data=junk), "--run-dir", tmp_path / "bad", "--backend", "mpi")
    wait_done(job_id, on_pending_requeue=False)
    log = next((tmp_path / "bad").glob("slurm-*.out")).read_text()
    assert "is not a readable HDF5 file" in log and "exited with code 2" in log, log
    info = _job_info(job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"


def test_dask_jobqueue_workers_are_slurm_jobs(slurm, tmp_path):
    job = tiny_job(tmp_path, steps=4, every=4)
    ndde("train", job, "--run-dir", tmp_path / "ref")
    before = set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())
    ndde("train", job, "--run-dir", tmp_path / "ds", "--backend", "dask-slurm", "--workers", "2",
         "--set", 'slurm.time="00:10:00"', "--set", 'slurm.mem="1G"')
    assert_same_bits(_final(tmp_path / "ds", 4), _final(tmp_path / "ref", 4))
    with h5py.File(_final(tmp_path / "ds", 4)) as f:
        assert f.attrs["backend"] == "dask-slurm"
    out = subprocess.run(["scontrol", "show", "job"], capture_output=True, text=True).stdout
    workers = [blk for blk in out.split("\n\n") if "JobName=ndde-worker" in blk
               and blk.split("JobId=")[1].split()[0] not in before]
    assert len(workers) >= 2, "expected two dask workers submitted as Slurm jobs"
    assert len(list((tmp_path / "ds" / "dask-workers").glob("*.out"))) >= 2  # worker logs in the run dir


def test_sweep_submits_one_array_of_dask_jobs(slurm, tmp_path):
    """Each array task trains with the dask backend: a LocalCluster inside its allocation."""
    job = tiny_job(tmp_path, steps=3, every=3)
    job_id = ndde("sweep", job, "--grid", "optimizer.learning_rate=0.01,0.03", "--sweep-dir", tmp_path / "sw",
                  "--backend", "dask").stdout.strip().splitlines()[-1]
    wait_done(job_id)
    lrs = []
    for point in ("point-000", "point-001"):
        with h5py.File(_final(tmp_path / "sw" / point, 3)) as f:
            lrs.append(float(f.attrs["config"].split("learning_rate = ")[1].split()[0]))
            assert f.attrs["backend"] == "dask" and f.attrs["slurm_job_id"] > 0
    assert lrs == [0.01, 0.03]
