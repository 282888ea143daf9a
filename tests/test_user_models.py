"""A user's own model through ``[model] entry``: the hutchinson example trained by the local,
Dask and MPI backends to the same bits and resumed after SIGKILL bit-identically, its code
copied into the run and guarded by its sha256; an ODE model on a user's own file; every
refusal of an entry, its options and its params; an equinox MLP through a checkpoint."""

import hashlib
import shutil
import subprocess
import sys

import equinox as eqx
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipeline import config, runner
from pipeline.checkpoint import CheckpointManager, leaf_paths
from pipeline.data import read_rows
from pipeline.models import build_model, masked_mse, split_params
from tests.pipeline_helpers import (
    ROOT,
    assert_same_bits,
    ndde,
    sigkill_mid_step_then_resume,
)

EXAMPLE = ROOT / "examples" / "hutchinson"
STEPS = 6


def _ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}.h5"


@pytest.fixture(scope="module")
def hutch(tmp_path_factory):
    """The example copied to a directory of its own, its data generated there, and the
    reference run (local backend, 2 shards) trained from it."""
    tmp = tmp_path_factory.mktemp("hutchinson")
    for name in ("hutchinson.py", "hutchinson.toml"):
        shutil.copy(EXAMPLE / name, tmp / name)
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), str(tmp / "data.h5")], check=True)
    ndde("train", tmp / "hutchinson.toml", "--run-dir", tmp / "ref", "--steps", STEPS, "--set", "checkpoint.every=2")
    return tmp


def test_the_example_trains_and_its_code_travels_with_the_run(hutch):
    ref = hutch / "ref"
    copy = ref / "model" / "hutchinson.py"
    assert copy.read_bytes() == (hutch / "hutchinson.py").read_bytes()
    assert config.load(ref / "job.toml").model.source == str(copy)
    with h5py.File(_ckpt(ref, STEPS)) as f:
        assert f.attrs["model_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
        assert f.attrs["model_file"] == str(copy)
        assert sorted(f["params"]) == ["K", "r", "tau"] and f["params/tau"].dtype == np.float64
        loss, tau = f["metrics/loss"][...], f["metrics/tau"][...]
    assert loss[-1] < loss[0] and np.all(np.isfinite(tau)) and tau[0] != 0.5


@pytest.mark.slow
def test_the_example_on_dask_and_mpi_matches_local(hutch, tmp_path):
    job, ref = hutch / "hutchinson.toml", _ckpt(hutch / "ref", STEPS)
    common = ("--steps", STEPS, "--set", "checkpoint.every=2")
    ndde("train", job, "--run-dir", tmp_path / "dask", "--backend", "dask", "--workers", 2, *common)
    assert_same_bits(_ckpt(tmp_path / "dask", STEPS), ref)
    ndde("train", job, "--run-dir", tmp_path / "mpi", "--backend", "mpi", *common, mpi_ranks=2)
    assert_same_bits(_ckpt(tmp_path / "mpi", STEPS), ref)
    assert (tmp_path / "mpi" / "model" / "hutchinson.py").is_file()


@pytest.mark.slow
def test_the_example_resumes_after_sigkill_bit_identically(hutch, tmp_path):
    final = sigkill_mid_step_then_resume(hutch / "hutchinson.toml", tmp_path / "run", 3, STEPS, "--steps", STEPS,
                                         "--set", "checkpoint.every=2")
    assert_same_bits(final, _ckpt(hutch / "ref", STEPS))


def test_resume_refuses_changed_model_code_unless_allowed(hutch, tmp_path):
    run = tmp_path / "run"
    ndde("train", hutch / "hutchinson.toml", "--run-dir", run, "--steps", 2)
    copy = run / "model" / "hutchinson.py"
    copy.write_text(copy.read_text() + "\n# changed\n")
    refused = ndde("resume", run, "--steps", 3, check=False)
    assert refused.returncode == 2 and f"the model code {copy} changed" in refused.stderr, refused.stderr
    assert not _ckpt(run, 3).exists()
    ndde("resume", run, "--steps", 3, "--allow-model-change")
    with h5py.File(_ckpt(run, 3)) as f:
        assert f.attrs["model_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()


DECAY = """
import jax.numpy as jnp
import pipeline

def make_model(rate=0.5):
    return pipeline.Model(init=lambda key: {"a": jnp.full((2,), -rate)}, rhs=lambda t, x, params: params["a"] * x)
"""


def _users_file(path, d=2, n=6):
    ts = np.linspace(0.0, 1.0, 5)
    x0 = np.linspace(0.5, 1.0, n * d).reshape(n, d)
    with h5py.File(path, "w") as f:
        f["ts"], f["ys"], f["x0"] = ts, x0[:, None, :] * np.exp(-ts)[None, :, None], x0
        f["ys"][0, 2, 0] = np.nan  # a missing observation
    return path


def _job(tmp_path, entry="decay:make_model", options="", module=DECAY, extra=""):
    (tmp_path / "decay.py").write_text(module)
    if not (tmp_path / "own.h5").exists():
        _users_file(tmp_path / "own.h5")
    path = tmp_path / "job.toml"
    path.write_text(f'name = "own"\n[model]\nentry = "{entry}"\n[model.options]\n{options}\n{extra}'
                    '[data]\npath = "own.h5"\nn_train = 4\nn_test = 2\n[train]\nbatch_size = 2\nsteps = 2\n'
                    '[backend]\nworkers = 1\n[checkpoint]\nevery = 1\n')
    return path


def test_an_ode_model_trains_on_a_users_own_file(tmp_path):
    ndde("train", _job(tmp_path, options="rate = 0.2"), "--run-dir", tmp_path / "run")
    with h5py.File(_ckpt(tmp_path / "run", 2)) as f:
        a, loss = f["params/a"][...], f["metrics/loss"][...]
        assert "own.h5" in f.attrs["config"] and np.all(np.isfinite(loss))
    assert a.shape == (2,) and not np.array_equal(a, [-0.2, -0.2])


GRAD_MLP = """
import equinox as eqx
import jax
import jax.numpy as jnp
import pipeline

def make_model(width=8):
    def rhs(t, x, lagged, params):
        potential = lambda z: params["net"](z)[0]
        return -jax.grad(potential)(lagged[0]) - params["damping"] * x

    return pipeline.Model(
        init=lambda key: {"net": eqx.nn.MLP(2, 1, width, 1, activation=jnp.tanh, key=key),
                          "damping": jnp.asarray(0.1), "tau": jnp.asarray(0.3)},
        rhs=rhs, delays=lambda params: jnp.stack([params["tau"]]))
"""


def test_a_dde_whose_rhs_differentiates_an_equinox_mlp_trains_and_resumes(tmp_path):
    """params with an eqx.nn.MLP (its activation a static leaf) through training, checkpoints
    and resume: the resumed run reaches the bits of one that never stopped."""
    job = _job(tmp_path, module=GRAD_MLP)
    ndde("train", job, "--run-dir", tmp_path / "whole", "--steps", 3)
    stopped = ndde("train", job, "--run-dir", tmp_path / "split", "--steps", 3, "--set", "checkpoint.every=2",
                   env={"NDDE_TEST_NAN_AT_STEP": "3"}, check=False)  # step 3 fails, step 2 is checkpointed
    assert stopped.returncode == 3 and _ckpt(tmp_path / "split", 2).exists() and not _ckpt(tmp_path / "split", 3).exists()
    ndde("resume", tmp_path / "split")
    assert_same_bits(_ckpt(tmp_path / "split", 3), _ckpt(tmp_path / "whole", 3))
    with h5py.File(_ckpt(tmp_path / "whole", 3)) as f:
        assert sorted(f["params"]) == ["damping", "net", "tau"]
        assert f["params/net/layers/0/weight"].shape == (8, 2) and f["metrics/tau"][-1] != 0.3


def _refusal(job_path) -> str:
    with pytest.raises(config.ConfigError) as info:
        runner.dry_run(config.load(job_path), job_path.parent / "run")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_an_entry_that_does_not_import_names_the_module_and_where_it_looked(tmp_path):
    msg = _refusal(_job(tmp_path, entry="nosuch:make_model"))
    assert "module 'nosuch' not found" in msg and str(tmp_path.resolve() / "nosuch.py") in msg and "sys.path" in msg
    msg = _refusal(_job(tmp_path, module="1 / 0\n"))
    assert f"importing {tmp_path.resolve() / 'decay.py'} failed: ZeroDivisionError" in msg
    assert "has no function 'other'" in _refusal(_job(tmp_path, entry="decay:other"))
    result = ndde("train", _job(tmp_path, entry="nosuch:make_model"), "--run-dir", tmp_path / "r", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "module 'nosuch' not found" in result.stderr
    assert not (tmp_path / "r").exists()


def test_a_function_that_returns_no_model_is_refused(tmp_path):
    msg = _refusal(_job(tmp_path, module="def make_model():\n    return {'init': None}\n"))
    assert "returned dict, not a pipeline.Model" in msg
    msg = _refusal(_job(tmp_path, module="def make_model():\n    raise ValueError('no such r0')\n"))
    assert "model.entry 'decay:make_model' failed with the job's options: ValueError: no such r0" in msg


def test_an_rhs_of_another_shape_than_the_data_is_refused(tmp_path):
    module = DECAY.replace('params["a"] * x', "jnp.zeros(3)")
    msg = _refusal(_job(tmp_path, module=module))
    assert "rhs(t, x, params) returned shape (3,); the data's state has shape (2,)" in msg
    lagged = DECAY.replace("rhs=lambda t, x, params: params[\"a\"] * x",
                           "rhs=lambda t, x, lagged, params: lagged, delays=lambda params: jnp.ones(1)")
    assert "rhs(t, x, lagged, params) returned shape (1, 2)" in _refusal(_job(tmp_path, module=lagged))


def test_options_the_function_does_not_take_are_refused(tmp_path):
    msg = _refusal(_job(tmp_path, options="rate = 0.1\nbogus = 1"))
    assert "model.options.bogus: decay:make_model does not take it; it takes: rate" in msg


@pytest.mark.parametrize("init,needle", [
    ('{"a": jnp.arange(2)}', "params['a'] of dtype int"),
    ('{"a": 0.5}', "params['a'] = 0.5 (float)"),
    ('{"a": "x"}', "params['a'] = 'x' (str)"),
])
def test_params_that_are_not_float_arrays_are_refused(tmp_path, init, needle):
    module = DECAY.replace('{"a": jnp.full((2,), -rate)}', init)
    assert needle in _refusal(_job(tmp_path, module=module))


def test_kind_and_entry_keys_that_contradict_are_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="model.hidden belongs to the kind shorthand"):
        config.from_dict({"model": {"entry": "decay:make_model", "hidden": [4]}})
    with pytest.raises(config.ConfigError, match="data.t1 is for generated data only"):
        config.from_dict({"model": {"entry": "decay:make_model"}, "data": {"path": "own.h5", "t1": 2.0}})
    with pytest.raises(config.ConfigError, match="name the model twice"):
        config.from_dict({"model": {"entry": "decay:make_model", "kind": "ndde"}})
    job = config.load(_job(tmp_path, options="rate = 0.1\nnested = {a = [1, 2.5]}"), ["model.options.rate=0.3"])
    assert job.model.options == {"rate": 0.3, "nested": {"a": [1, 2.5]}}
    assert config.from_toml_text(job.to_toml()) == job


def test_a_loss_entry_replaces_the_masked_mean_squared_error(tmp_path):
    (tmp_path / "myloss.py").write_text("import jax.numpy as jnp\n\ndef l1(pred, obs, mask):\n"
                                        "    return jnp.sum(jnp.where(mask, jnp.abs(pred - obs), 0.0))\n")
    job = config.load(_job(tmp_path, extra='[loss]\nentry = "myloss:l1"\n'))
    model = build_model(job.replace("loss", source=str(tmp_path / "myloss.py")))
    pred, obs = jnp.ones((3, 2)), jnp.zeros((3, 2))
    mask = jnp.array([[True, True], [False, True], [True, True]])
    assert float(model.loss(pred, obs, mask)) == 5.0
    assert float(build_model(job.replace("loss", entry="")).loss(pred, obs, mask)) == pytest.approx(1.0, rel=1e-15)


def test_a_missing_observation_is_masked_out_of_the_loss_and_its_gradient(tmp_path):
    """NaN in ys reads as mask False and obs 0; whatever value sits there changes nothing."""
    job = config.load(_job(tmp_path))
    rows = read_rows(tmp_path / "own.h5", job, 0, 1, np.float64)
    assert not rows["mask"][0, 2, 0] and rows["ys"][0, 2, 0] == 0.0 and rows["mask"].sum() == rows["mask"].size - 1
    pred, obs, mask = jnp.asarray(rows["ys"][0]) + 0.1, jnp.asarray(rows["ys"][0]), jnp.asarray(rows["mask"][0])
    value_and_grad = jax.value_and_grad(masked_mse)
    loss, grad = value_and_grad(pred, obs, mask)
    loss_other, grad_other = value_and_grad(pred, obs.at[2, 0].set(1e6), mask)
    assert float(loss) == float(loss_other) == pytest.approx(0.01, rel=1e-12)
    assert np.array_equal(grad, grad_other) and float(grad[2, 0]) == 0.0


def test_an_equinox_mlp_in_the_params_round_trips_a_checkpoint(tmp_path):
    tree = {"net": eqx.nn.MLP(2, 1, 4, 1, key=jax.random.PRNGKey(0)), "tau": jnp.asarray(0.5)}
    theta, static = split_params(tree, jnp.float64, "test")
    opt = optax.adam(1e-3)
    manager = CheckpointManager(tmp_path)
    trained = jax.tree_util.tree_map(lambda a: a + 1.0, theta)
    manager.save(1, trained, opt.init(trained), np.zeros(2, np.uint64), {}, "x = 1\n")
    names = [n for n, _ in leaf_paths(trained)]
    assert "net/layers/0/weight" in names and "net/layers/1/bias" in names and "tau" in names
    restored = manager.restore(1, theta, opt.init(theta))
    assert jax.tree_util.tree_structure(restored.params) == jax.tree_util.tree_structure(theta)
    net = eqx.combine(jax.tree_util.tree_map(jnp.asarray, restored.params), static)["net"]
    x = jnp.array([0.3, -0.2])
    assert isinstance(net, eqx.nn.MLP)
    assert float(net(x)[0]) == float(eqx.combine(trained, static)["net"](x)[0])
    assert float(net(x)[0]) != float(tree["net"](x)[0])


def test_a_runs_copy_of_the_model_is_never_overwritten_and_is_what_a_moved_run_resumes_with(tmp_path):
    from pipeline.entry import copy_into_run
    ndde("train", _job(tmp_path), "--run-dir", tmp_path / "run", "--steps", 1)
    copy = tmp_path / "run" / "model" / "decay.py"
    kept = copy.read_bytes()
    (tmp_path / "decay.py").write_text(DECAY.replace("-rate", "-2 * rate"))  # the original edited since
    copy_into_run(config.load(_job(tmp_path, module=(tmp_path / "decay.py").read_text())), tmp_path / "run")
    assert copy.read_bytes() == kept
    shutil.move(tmp_path / "run", tmp_path / "moved")
    job = runner.load_run_job(tmp_path / "moved")
    assert job.model.source == str((tmp_path / "moved" / "model" / "decay.py").resolve())
    ndde("resume", tmp_path / "moved", "--steps", 2)
    with h5py.File(_ckpt(tmp_path / "moved", 2)) as f:
        assert f.attrs["model_sha256"] == hashlib.sha256(kept).hexdigest()


def test_each_sweep_point_gets_its_own_copy_of_the_model(tmp_path, monkeypatch):
    from pipeline import submit
    monkeypatch.setattr(submit, "sbatch", lambda path: "4242")
    job = _job(tmp_path)
    submit.sweep(job, ["optimizer.learning_rate=1e-3,3e-3"], tmp_path / "sw", flags={"backend": "mpi"})
    for point in ("point-000", "point-001"):
        copy = tmp_path / "sw" / point / "model" / "decay.py"
        assert copy.read_text() == DECAY
        assert config.load(tmp_path / "sw" / point / "job.toml").model.source == str(copy.resolve())


def test_shard_caches_follow_the_codes_digest_and_a_file_of_another_digest_is_refused(tmp_path):
    from pipeline import entry, shard
    job = config.load(_job(tmp_path)).replace("model", source=str(tmp_path / "decay.py"))
    job = job.replace("data", path=str(job.data_path.resolve()))
    text, data = job.to_toml(), str(job.data_path)
    before = entry.expected(job)
    first = shard.worker_for(text, data, 0, 1)
    (tmp_path / "decay.py").write_text(DECAY.replace("-rate", "-2 * rate"))  # same path, other code
    second = shard.worker_for(text, data, 0, 1)
    assert second is not first and entry.expected(job) != before
    assert float(second.model.theta0["a"][0]) == 2 * float(first.model.theta0["a"][0])
    assert shard.worker_for(text, data, 0, 1, before) is first
    with pytest.raises(config.ConfigError, match="but this run's root process loaded"):
        build_model(job, dict(before))


def test_the_held_out_mse_counts_observed_points_only_and_shows_a_nan_prediction():
    from pipeline.report import observed_mse
    ys = np.array([[1.0, np.nan], [2.0, 3.0]])
    mask = ~np.isnan(ys)
    assert observed_mse(np.array([[2.0, 5.0], [2.0, 1.0]]), ys, mask) == pytest.approx(5.0 / 3)
    assert np.isnan(observed_mse(np.array([[np.nan, 0.0], [2.0, 3.0]]), ys, mask))
    assert observed_mse(np.array([[1.0, np.nan], [2.0, 3.0]]), ys, mask) == 0.0  # NaN where nothing is observed


LAGGED = DECAY.replace('rhs=lambda t, x, params: params["a"] * x',
                       'rhs=lambda t, x, lagged, params: params["a"] * lagged[0], delays=lambda params: jnp.ones(1)')


def test_a_dde_entry_asking_for_backsolve_is_refused_up_front(tmp_path):
    msg = _refusal(_job(tmp_path, module=LAGGED, extra='[solver]\nsensitivity = "backsolve"\n'))
    assert "'backsolve' works for ODEs only; model.entry 'decay:make_model' is a DDE" in msg
    assert "'interpolating', 'quadrature', 'backprop' or 'forward'" in msg
    # an ODE entry with backsolve is accepted:
    runner.dry_run(config.load(_job(tmp_path, extra='[solver]\nsensitivity = "backsolve"\n')), tmp_path / "run")


GRADIENT_FIELD = """
import jax.numpy as jnp
import pipeline
import solvers

def make_model(d=2):
    H = lambda x, params: HSUM(params["w"] * x ** 2)
    return pipeline.Model(init=lambda key: {"w": jnp.ones(2)}, rhs=solvers.GradientField(H=H, J=-jnp.eye(d)))
"""


def test_a_gradient_field_whose_j_or_h_does_not_fit_is_refused(tmp_path):
    msg = _refusal(_job(tmp_path, module=GRADIENT_FIELD.replace("HSUM", "jnp.sum"), options="d = 3"))
    assert "GradientField: J must be a (d, d) matrix with d = x.shape[-1] = 2, got shape (3, 3)" in msg
    msg = _refusal(_job(tmp_path, module=GRADIENT_FIELD.replace("HSUM", "")))
    assert "GradientField: H(x, p) must return a scalar" in msg
    runner.dry_run(config.load(_job(tmp_path, module=GRADIENT_FIELD.replace("HSUM", "jnp.sum"))), tmp_path / "run")


def test_a_package_is_refused_as_an_entry_module(tmp_path):
    from pipeline import entry
    with pytest.raises(config.ConfigError, match="'pipeline.zoo' is a package .* one self-contained module file"):
        entry.locate("pipeline.zoo:make_model")
    assert entry.locate("pipeline.zoo.hnn:make_model").name == "hnn.py"
