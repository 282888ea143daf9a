"""Dask worker processes run with glibc's malloc defaults: distributed's nanny exports
MALLOC_TRIM_THRESHOLD_, which made XLA's large temporaries 2.1x slower (bench/README.md)."""

import os
import subprocess
import sys

import pytest

from pipeline.backends.dask_backend import DaskBackend, slurm_cluster
from tests.pipeline_helpers import tiny_job

pytestmark = pytest.mark.slow


def _worker_env():
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")


def test_local_cluster_workers_have_no_malloc_trim_threshold(tmp_path):
    backend = DaskBackend(tiny_job(tmp_path).read_text(), str(tmp_path / "unused.h5"), workers=2)
    try:
        backend.client.wait_for_workers(2, timeout=60)
        envs = backend.client.run(_worker_env)
    finally:
        backend.close()
    assert len(envs) == 2
    # The variable is gone while the nanny's other pre-spawn settings still apply.
    assert all(env == (None, "1") for env in envs.values()), envs


def test_slurm_worker_script_unsets_malloc_trim_threshold(tmp_path):
    cluster = slurm_cluster(tiny_job(tmp_path).read_text(), tmp_path / "logs")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    line = next(ln for ln in script.splitlines() if "PRE_SPAWN_ENVIRON" in ln)
    assert line.startswith("export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=")
    assert script.index(line) < script.index("distributed.cli.dask_worker")
    assert "--nanny" in script
    assert f"--output={tmp_path / 'logs'}" in script.replace("#SBATCH -o ", "--output=")  # worker logs in the run dir
    # What the nanny in that Slurm job will export to its worker once the line has run:
    probe = ("from distributed.nanny import _get_env_variables; "
             "print(sorted(_get_env_variables('distributed.nanny.pre-spawn-environ')))")
    out = subprocess.run(["bash", "-c", f"{line}; {sys.executable} -c \"{probe}\""], capture_output=True,
                         text=True, check=True).stdout
    assert "OMP_NUM_THREADS" in out and "MALLOC_TRIM_THRESHOLD_" not in out
