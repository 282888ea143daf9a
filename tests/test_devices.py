"""One GPU per worker or rank: the assignment, tested without GPUs."""

import pytest

from pipeline import devices


def test_local_rank_from_launchers():
    assert devices.local_rank({"MPI_LOCALRANKID": "1"}) == 1
    assert devices.local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert devices.local_rank({"SLURM_LOCALID": "2"}) == 2
    assert devices.local_rank({}) is None


def test_visible_gpus(tmp_path):
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert devices.visible_gpus({}, proc_root=tmp_path / "none") == []
    for i in range(4):
        (tmp_path / f"0000:0{i}:00.0").mkdir()
    assert devices.visible_gpus({}, proc_root=tmp_path) == ["0", "1", "2", "3"]


def test_gpu_for_is_one_per_rank_round_robin():
    gpus = ["0", "1", "2", "3"]
    assert [devices.gpu_for(r, gpus) for r in range(4)] == gpus
    assert devices.gpu_for(5, gpus) == "1"
    assert devices.gpu_for(0, []) is None
    with pytest.raises(ValueError, match="-1"):
        devices.gpu_for(-1, gpus)


def test_pin_sets_cuda_visible_devices_only_with_gpus():
    env = {"CUDA_VISIBLE_DEVICES": "4,6"}
    assert devices.pin(1, env) == "6" and env["CUDA_VISIBLE_DEVICES"] == "6"
    env = {"CUDA_VISIBLE_DEVICES": ""}
    assert devices.pin(0, env) is None and env["CUDA_VISIBLE_DEVICES"] == ""
    assert devices.pin(None, {}) is None
