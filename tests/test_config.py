"""Job files: every shipped job parses; bad keys, types and values are errors naming the key."""

import dataclasses

import pytest

from pipeline import config
from tests.pipeline_helpers import ROOT

JOBS = sorted((ROOT / "jobs").glob("*.toml"))


def test_three_jobs_ship_and_parse():
    names = {p.stem for p in JOBS}
    assert {"hnn_pendulum", "ndde_mackey_glass", "delayed_gradient"} <= names
    for path in JOBS:
        job = config.load(path)
        assert job.name == path.stem


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_resolved_toml_round_trips(path):
    job = config.load(path, ["solver.rtol=1e-07", "model.hidden=[4, 5]"])
    assert config.from_toml_text(job.to_toml()) == job
    assert job.solver.rtol == 1e-7 and job.model.hidden == (4, 5)


def _err(tmp_path, text, overrides=()):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path, overrides)
    return str(info.value)


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path):
    msg = _err(tmp_path, "[solver]\nrtoll = 1e-6\n")
    assert "solver.rtoll" in msg and "rtol" in msg and "atol" in msg


def test_unknown_section(tmp_path):
    assert "'solvr'" in _err(tmp_path, "[solvr]\nrtol = 1e-6\n")


def test_wrong_type_names_key_and_type(tmp_path):
    msg = _err(tmp_path, '[train]\nsteps = "ten"\n')
    assert "train.steps" in msg and "int" in msg


def test_bool_is_not_an_int(tmp_path):
    assert "train.steps" in _err(tmp_path, "[train]\nsteps = true\n")


def test_choice_lists_allowed_values(tmp_path):
    msg = _err(tmp_path, '[solver]\nsensitivity = "magic"\n')
    assert "solver.sensitivity" in msg and "'interpolating'" in msg and "'backprop'" in msg


@pytest.mark.parametrize("text,key", [("[solver]\nrtol = 0.0\n", "solver.rtol"),
                                      ("[solver]\nrtol = -1e-6\n", "solver.rtol"),
                                      ("[model]\ntau_init = 0.0\n", "model.tau_init"),
                                      ("[train]\nbatch_size = 0\n", "train.batch_size"),
                                      ("[checkpoint]\nkeep = 0\n", "checkpoint.keep"),
                                      ("[solver]\natol = nan\n", "solver.atol"),
                                      ("[model]\nhidden = [8, -1]\n", "model.hidden"),
                                      # was distributed's traceback "missing port number in address"
                                      ('[backend]\nscheduler = "badaddr"\n', "backend.scheduler")])
def test_out_of_range(tmp_path, text, key):
    assert key in _err(tmp_path, text)


def test_scheduler_address_is_checked(tmp_path):
    assert "backend.scheduler must match" in _err(tmp_path, '[backend]\nscheduler = "tcp://node-3"\n')
    assert "(host:port or tcp://host:port), got 'tcp://node-3'" in _err(tmp_path, '[backend]\nscheduler = "tcp://node-3"\n')


def test_invalid_toml_names_file(tmp_path):
    assert "bad.toml" in _err(tmp_path, "[solver\n")


def test_model_and_data_must_fit(tmp_path):
    msg = _err(tmp_path, '[model]\nkind = "ndde"\n[data]\nsystem = "pendulum"\n')
    assert "mackey_glass" in msg


def test_backsolve_on_a_dde_model_is_refused(tmp_path):
    msg = _err(tmp_path, '[model]\nkind = "ndde"\n[data]\nsystem = "mackey_glass"\n'
                         '[solver]\nsensitivity = "backsolve"\n')
    assert "interpolating" in msg


def test_batch_must_split_over_workers(tmp_path):
    assert "backend.workers" in _err(tmp_path, "[train]\nbatch_size = 5\n[backend]\nworkers = 2\n")


def test_warmup_must_end_before_the_last_step(tmp_path):
    msg = _err(tmp_path, "[train]\nsteps = 20\n[optimizer]\nwarmup_steps = 20\n")
    assert "optimizer.warmup_steps 20 must be below train.steps 20" in msg


@pytest.mark.parametrize("schedule, end", [("cosine", 0.0), ("exponential", 0.1), ("constant", 1.0)])
@pytest.mark.parametrize("warmup", [0, 30])
def test_schedule_is_laid_out_over_train_steps(schedule, end, warmup):
    """The decay after a warmup ends at train.steps (with the warmup, cosine ended 30 steps
    later: still 10% of the peak at the last step)."""
    from pipeline.train import learning_rate_schedule

    job = config.from_dict({"train": {"steps": 150}, "optimizer": {
        "learning_rate": 0.01, "schedule": schedule, "decay_rate": 0.1, "warmup_steps": warmup}})
    lr = lambda step: float(learning_rate_schedule(job)(step))
    assert lr(warmup) == pytest.approx(0.01, rel=1e-6)
    assert lr(150) == pytest.approx(0.01 * end, rel=1e-5, abs=1e-12)
    if warmup:
        assert lr(0) == 0.0 and lr(warmup // 2) == pytest.approx(0.005, rel=1e-6)


def test_overrides(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("")
    job = config.load(path, ["train.steps=7", "backend.kind=dask", 'optimizer.name="sgd"'])
    assert (job.train.steps, job.backend.kind, job.optimizer.name) == (7, "dask", "sgd")
    assert "train.stepz" in _err(tmp_path, "", ["train.stepz=3"])
    assert "section.key=value" in _err(tmp_path, "", ["steps=3"])
    assert "'nope'" in _err(tmp_path, "", ["nope.x=3"])


def test_differences_names_changed_keys():
    a = config.from_dict({})
    b = dataclasses.replace(a, model=dataclasses.replace(a.model, hidden=(4,)))
    assert config.differences(a, b, ("model", "data")) == ["model.hidden: (32, 32) -> (4,)"]


def test_solver_history_size_reaches_the_solve():
    """solver.history_size is what a DDE model's solve keeps (0: the solver's default)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from pipeline.models import build_model

    raw = {"model": {"kind": "ndde"}, "data": {"system": "mackey_glass"}}
    sample = {"x0": jnp.array([0.5]), "history": jnp.array([0.5])}
    ts = jnp.linspace(0.0, 3.0, 4)
    for size, fails in ((2, True), (0, False)):
        job = config.from_dict(raw | {"solver": {"history_size": size}})
        model = build_model(job)
        solve = lambda: model.solve(job, model.init(jax.random.PRNGKey(0)), sample, ts).ys
        if fails:
            with pytest.raises(eqx.EquinoxRuntimeError, match="history buffer full: history_size=2 "):
                solve()
        else:
            assert bool(jnp.all(jnp.isfinite(solve())))
