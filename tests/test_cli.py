"""The shipped jobs run as they are: the demo job (what `make demo` runs: Dask, 2 workers)
learns and reports; the two DDE jobs generate their data and train their delay."""

import json

import h5py
import numpy as np
import pytest

from tests.pipeline_helpers import ROOT, ndde


@pytest.mark.slow
def test_demo_job_trains_on_dask_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    out = ndde("train", ROOT / "jobs" / "hnn_pendulum.toml", "--run-dir", run).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 150 and (tmp_path / "data" / "hnn_pendulum.h5").exists()
    with h5py.File(run / "checkpoints" / "step_00000150.h5") as f:
        loss = f["metrics/loss"][...]
        assert f.attrs["backend"] == "dask" and f.attrs["shards"] == 2
    assert loss[-1] < 0.02 * loss[0], loss[[0, -1]]
    assert "held-out MSE" in ndde("report", run).stdout
    assert (run / "report.png").stat().st_size > 20_000


@pytest.mark.slow
@pytest.mark.parametrize("name,system,tau0", [("ndde_mackey_glass", "mackey_glass", 1.5),
                                              ("delayed_gradient", "delayed_gradient", 0.3)])
def test_dde_jobs_run_as_shipped(tmp_path, monkeypatch, name, system, tau0):
    monkeypatch.chdir(tmp_path)
    ndde("data", ROOT / "jobs" / f"{name}.toml")
    with h5py.File(tmp_path / "data" / f"{name}.h5") as f:
        assert f.attrs["system"] == system and "history" in f
    ndde("train", ROOT / "jobs" / f"{name}.toml", "--run-dir", "run", "--steps", "3")
    with h5py.File(tmp_path / "run" / "checkpoints" / "step_00000003.h5") as f:
        tau, loss = f["metrics/tau"][...], f["metrics/loss"][...]
    assert np.all(np.isfinite(loss)) and tau.shape == (3,)
    assert np.all(tau != tau0) and np.all(np.abs(tau - tau0) < 0.1)
