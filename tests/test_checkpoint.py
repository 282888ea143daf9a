"""HDF5 checkpoints: atomic, verified, pickle-free; broken newest files are skipped."""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipeline.checkpoint import CheckpointError, CheckpointManager, contents_digest, leaf_paths


def _state(seed=0):
    params = {"f": [{"w": jnp.arange(6.0).reshape(2, 3) + seed, "b": jnp.zeros(3)}], "tau": jnp.asarray(0.5)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    return params, opt.init(params)


def _save(manager, step, seed=0):
    params, opt_state = _state(seed)
    return manager.save(step, params, opt_state, np.array([0, step], np.uint64),
                        {"loss": np.linspace(1, 0, step)}, "name = \"x\"\n", {"shards": 2})


def test_round_trip_and_layout(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    path = _save(manager, 4)
    assert path.name == "step_00000004.h5"
    params, opt_state = _state()
    restored = manager.restore(4, params, opt_state)
    assert restored.step == 4 and restored.attrs["shards"] == 2
    for a, b in zip(jax.tree_util.tree_leaves((params, opt_state)),
                    jax.tree_util.tree_leaves((restored.params, restored.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(restored.opt_state) == jax.tree_util.tree_structure(opt_state)
    with h5py.File(path) as f:
        assert f.attrs["format"] == "ndde-checkpoint" and f.attrs["version"] == 1 and f.attrs["step"] == 4
        assert "params/f/0/w" in f and "params/tau" in f and "opt_state/1/0/mu/f/0/b" in f
        assert "rng" in f and "metrics/loss" in f
        assert f.attrs["sha256"] == contents_digest(f)
        kinds = []
        f.visititems(lambda n, o: kinds.append(o.dtype.kind) if isinstance(o, h5py.Dataset) else None)
        assert set(kinds) <= set("fiub"), "object (pickled) data in a checkpoint"


def test_keep_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        _save(manager, step)
    assert manager.steps() == [3, 4] and manager.latest_step() == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_broken_newest_is_skipped_with_a_warning_naming_it(tmp_path, damage):
    manager = CheckpointManager(tmp_path, keep=3)
    _save(manager, 1)
    newest = _save(manager, 2, seed=1)
    raw = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        with h5py.File(newest, "r+") as f:
            f["params/tau"][...] = 0.75
    else:
        newest.write_bytes(b"")
    with pytest.warns(UserWarning, match="step_00000002.h5"):
        assert manager.latest_valid_step() == 1


def test_leftover_temporary_file_is_ignored(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 1)
    (tmp_path / "step_00000002.h5.tmp").write_bytes(b"partial")
    assert manager.steps() == [1] and manager.latest_valid_step() == 1


def test_restore_into_a_different_model_names_the_leaf(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 1)
    params, opt_state = _state()
    params = {**params, "f": [{"w": jnp.zeros((2, 4)), "b": jnp.zeros(4)}]}
    with pytest.raises(CheckpointError, match=r"/params/f/0/b has float\d\d\[3\], the model needs float\d\d\[4\]"):
        manager.restore(1, params, optax.adam(1e-3).init(params))


def test_leaf_paths_name_keys_attributes_and_indices():
    names = [n for n, _ in leaf_paths(_state()[1])]
    assert "1/0/count" in names and "1/0/nu/tau" in names
