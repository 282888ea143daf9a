"""HDF5 trajectory data: generated from the known systems, validated, read by shard."""

import h5py
import numpy as np
import pytest

from pipeline import config, data
from tests.pipeline_helpers import tiny_job


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    job = config.load(tiny_job(tmp))
    return job, data.generate(job)


def test_generated_pendulum_conserves_energy(tiny):
    job, path = tiny
    info = data.validate(path, job)
    assert info == {"n": 10, "n_times": 6, "dim": 2}
    with h5py.File(path) as f:
        ys, x0 = f["ys"][...], f["x0"][...]
        assert f.attrs["format"] == "ndde-data" and f.attrs["system"] == "pendulum"
    energy = 0.5 * ys[..., 1] ** 2 + 1 - np.cos(ys[..., 0])
    assert np.max(np.abs(energy - energy[:, :1])) < 1e-8
    np.testing.assert_array_equal(ys[:, 0], x0)


@pytest.mark.parametrize("system,kind", [("mackey_glass", "ndde"), ("delayed_gradient", "delayed_gradient")])
def test_dde_systems_write_history(tmp_path, system, kind):
    job = config.from_dict({"model": {"kind": kind}, "data": {"system": system, "n_train": 2, "n_test": 1,
                                                             "t1": 1.0, "n_times": 5,
                                                             "path": str(tmp_path / "d.h5")},
                            "train": {"batch_size": 2}})
    path = data.generate(job)
    data.validate(path, job)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["history"][...], f["x0"][...])
        assert f["ys"].shape == (3, 5, 1 if system == "mackey_glass" else 2)


def _broken_copy(tmp_path, path, edit):
    out = tmp_path / "broken.h5"
    with h5py.File(path) as src, h5py.File(out, "w") as dst:
        for name in src:
            src.copy(name, dst)
        edit(dst)
    return out


@pytest.mark.parametrize("edit,needle", [
    (lambda f: f.__delitem__("ys"), "no dataset 'ys'"),
    (lambda f: f.__delitem__("x0"), "no dataset 'x0'"),
    (lambda f: (f.__delitem__("x0"), f.__setitem__("x0", np.zeros((10, 3)))), "'x0' has shape (10, 3)"),
    (lambda f: (f.__delitem__("ts"), f.__setitem__("ts", np.linspace(1, 2, 6))), "starting at 0"),
    (lambda f: f["ys"].__setitem__((0, 1, 0), np.inf), "'ys' contains inf"),
    (lambda f: f["x0"].__setitem__((0, 1), np.nan), "'x0' contains NaN"),
])
def test_bad_layout_names_the_dataset(tmp_path, tiny, edit, needle):
    job, path = tiny
    with pytest.raises(data.DataError) as info:
        data.validate(_broken_copy(tmp_path, path, edit), job)
    assert needle in str(info.value)


def test_too_few_rows_and_missing_and_not_hdf5(tmp_path, tiny):
    job, path = tiny
    with pytest.raises(data.DataError, match="holds 10 trajectories"):
        data.validate(path, job.replace("data", n_train=20))
    with pytest.raises(data.DataError, match="does not exist"):
        data.validate(tmp_path / "nope.h5", job)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(data.DataError, match="not a readable HDF5"):
        data.validate(junk, job)


def test_a_generated_file_is_refused_for_another_data_section(tmp_path, tiny):
    """A job whose data section changed (noise, t1, n_times, seed, system) trained on the file
    made for the old one without a word; a file not written by `ndde data` is taken as it is."""
    job, path = tiny
    for key, value, needle in [("noise", 0.1, "data.noise = 0.1, the file's 0.0"),
                               ("t1", 2.0, "data.t1 = 2.0, the file's 1.0"),
                               ("n_times", 11, "data.n_times = 11, the file's 6"),
                               ("seed", 7, "data.seed = 7, the file's 1")]:
        with pytest.raises(data.DataError, match="was generated for another data section") as info:
            data.validate(path, job.replace("data", **{key: value}))
        assert needle in str(info.value)
    foreign = _broken_copy(tmp_path, path, lambda f: None)  # the datasets without ndde's attributes
    assert data.validate(foreign, job.replace("data", noise=0.1)) == {"n": 10, "n_times": 6, "dim": 2}
    assert data.validate(path, job.replace("data", n_train=4, n_test=1)) == {"n": 10, "n_times": 6, "dim": 2}


def test_ndde_data_keeps_a_file_that_holds_other_data(tmp_path, tiny):
    """`ndde data` overwrote whatever was at the path: the user's own data, or the file a run was
    trained on (which then could not resume). It now writes a missing file, keeps one that is
    what it would write, and refuses anything else without --force."""
    from tests.pipeline_helpers import ndde

    job_file = tiny_job(tmp_path, data=tmp_path / "d.h5")
    first = ndde("data", job_file)
    assert first.stdout.startswith(f"wrote {tmp_path / 'd.h5'}: 10 trajectories")
    before = data.digest(tmp_path / "d.h5")
    assert "is up to date" in ndde("data", job_file).stdout
    refused = ndde("data", job_file, "--set", "data.noise=0.1", check=False)
    assert refused.returncode == 2 and "generated for another data section (data.noise = 0.1" in refused.stderr
    assert data.digest(tmp_path / "d.h5") == before  # untouched
    own = _broken_copy(tmp_path, tiny[1], lambda f: None)  # a file ndde did not write
    refused = ndde("data", job_file, "--out", own, check=False)
    assert refused.returncode == 2 and "holds data that `ndde data` did not write" in refused.stderr
    assert "--force" in refused.stderr
    ndde("data", job_file, "--set", "data.noise=0.1", "--force")
    assert data.digest(tmp_path / "d.h5") != before


def test_shards_partition_the_training_rows():
    for n, shards in [(8, 2), (10, 3), (1024, 4), (7, 7)]:
        blocks = [data.shard_bounds(n, shards, w) for w in range(shards)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert max(hi - lo for lo, hi in blocks) - min(hi - lo for lo, hi in blocks) <= 1


def test_read_rows_reads_only_its_block(tiny):
    job, path = tiny
    rows = data.read_rows(path, job, 2, 5, np.float64)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(rows["ys"], f["ys"][2:5])
    assert rows["x0"].shape == (3, 2)


def test_generation_alongside_another_writer_of_the_same_file(tmp_path):
    """Two tasks of a sweep array generated the same data file at once: the second failed on
    the first's HDF5 lock of a shared temporary name (CI). Each writer now has its own."""
    job = config.load(tiny_job(tmp_path))
    legacy_tmp = job.data_path.with_name(job.data_path.name + ".tmp")
    with h5py.File(legacy_tmp, "w"):  # another process mid-write, holding its lock
        path = data.generate(job)
    assert data.validate(path, job) == {"n": 10, "n_times": 6, "dim": 2}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(path.name)) == [path.name, legacy_tmp.name]
