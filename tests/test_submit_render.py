"""sbatch generation is a pure function, tested against a recorded script; nothing from a
job file or a flag can inject shell code into it."""

import os
import pathlib
import stat
import subprocess

import pytest

from pipeline import config, submit
from tests.pipeline_helpers import ROOT

RECORDED = pathlib.Path(__file__).parent / "data" / "delayed_gradient_mpi.sbatch"


def _job(*overrides, backend="mpi"):
    job = config.load(ROOT / "jobs" / "delayed_gradient.toml", ["slurm.partition=\"gpu\"", "slurm.mem=\"8G\"",
                                                                 "slurm.time=\"0-02:00:00\"", *overrides])
    return submit.apply_flags(job, backend=backend, ntasks_per_node=2, gpus_per_node=2, nodes=1)


def test_render_matches_the_recorded_script():
    script = submit.render_sbatch(_job("slurm.extra=[\"--constraint=h100\"]"), ["/scratch/runs/dg"],
                                  "/scratch/runs/dg/slurm-%j.out", "/opt/ndde/.venv/bin/ndde",
                                  scontrol="/usr/bin/scontrol", hostname="/usr/bin/hostname")
    assert script == RECORDED.read_text()


def test_render_is_pure_and_reflects_flags():
    a = submit.render_sbatch(_job(), ["/r"], "/r/o", "/b/ndde")
    assert a == submit.render_sbatch(_job(), ["/r"], "/r/o", "/b/ndde")
    b = submit.render_sbatch(submit.apply_flags(_job(), nodes=3, time="10:00"), ["/r"], "/r/o", "/b/ndde")
    assert "#SBATCH --nodes=3" in b and "#SBATCH --time=10:00" in b
    srun = submit.render_sbatch(_job("slurm.launcher=\"srun\""), ["/r"], "/r/o", "/b/ndde")
    assert 'srun --kill-on-bad-exit=1 "$NDDE" resume "$RUN_DIR"' in srun
    dask = submit.render_sbatch(_job(backend="dask"), ["/r"], "/r/o", "/b/ndde")
    assert '\n"$NDDE" resume "$RUN_DIR" &\n' in dask and "mpiexec" not in dask
    array = submit.render_sbatch(_job(), ["/r/a", "/r/b c"], "/r/o", "/b/ndde")
    assert "#SBATCH --array=0-1" in array and "RUN_DIRS=(/r/a '/r/b c')" in array


def test_workers_follow_the_allocation():
    job = _job()
    assert job.backend.workers == 2 and job.backend.kind == "mpi"
    with pytest.raises(config.ConfigError, match="slurm.nodes must be 1"):
        submit.apply_flags(job, backend="dask", nodes=2)
    with pytest.raises(config.ConfigError, match="'mpi' or 'dask'"):
        submit.apply_flags(job, backend="local")


EVIL = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "x\ny", "x;touch PWNED", "x&&y"]


@pytest.mark.parametrize("value", EVIL)
@pytest.mark.parametrize("key", ["slurm.job_name", "slurm.partition", "slurm.account", "slurm.qos",
                                 "slurm.mem", "slurm.time"])
def test_sbatch_values_reject_shell_syntax(key, value):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.from_dict({key.split(".")[0]: {key.split(".")[1]: value}})


@pytest.mark.parametrize("value", EVIL + ["--ok\n#SBATCH --evil", "--comment=$(id)", "#SBATCH --x"])
def test_extra_lines_reject_shell_syntax(value):
    with pytest.raises(config.ConfigError, match="slurm.extra"):
        config.from_dict({"slurm": {"extra": [value]}})


@pytest.mark.parametrize("name", EVIL)
def test_job_names_reject_shell_syntax(name):
    with pytest.raises(config.ConfigError, match="name must be"):
        config.from_dict({"name": name})


def test_paths_with_quotes_or_newlines_cannot_reach_directives():
    for bad in ('/r/a"b', "/r/a\nb"):
        with pytest.raises(config.ConfigError, match="#SBATCH"):
            submit.render_sbatch(_job(), [bad], f"{bad}/o", "/b/ndde")


def _run_rendered(tmp_path, run_dir, fake, fake_body, env):
    """Render the dask job's script for run_dir with ``fake`` (writing ``fake_body``) as ndde and
    run it with bash (no Slurm) under env; returns what the fake wrote to $OUT."""
    fake.write_text("#!/bin/bash\n" + fake_body + "\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "job.sbatch"
    script.write_text(submit.render_sbatch(_job(backend="dask"), [run_dir], tmp_path / "o", fake))
    out = tmp_path / "out"
    subprocess.run(["bash", str(script)], cwd=tmp_path, check=True, env={**env, "OUT": str(out)}, capture_output=True)
    return out.read_bytes()


def test_hostile_paths_reach_the_program_verbatim(tmp_path):
    """The fake ndde must receive the run directory as one argument, and nothing in the path may
    execute."""
    weird = tmp_path / "dir with space 'q' $(touch PWNED) `touch PWNED` ;touch PWNED"
    weird.mkdir()
    bindir = tmp_path / "bin $(touch PWNED)"
    bindir.mkdir()
    args = _run_rendered(tmp_path, weird, bindir / "ndde", 'printf "%s\\0" "$@" > "$OUT"', os.environ)
    assert args.split(b"\0")[:-1] == [b"resume", str(weird).encode()]
    assert not list(tmp_path.rglob("PWNED")) and not (pathlib.Path.cwd() / "PWNED").exists()


def test_a_requeued_job_finds_its_compiled_step_in_the_run_dir(tmp_path):
    """The script points JAX's persistent compilation cache at RUN_DIR/jax-cache unless the
    submitting shell chose one: the requeued job loads the training step compiled before."""
    run_dir, fake = tmp_path / "run", tmp_path / "ndde"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for chosen, expected in ((None, f"{run_dir}/jax-cache"), ("/shared/cache", "/shared/cache")):
        extra = {"JAX_COMPILATION_CACHE_DIR": chosen} if chosen else {}
        got = _run_rendered(tmp_path, run_dir, fake, 'printf "%s" "$JAX_COMPILATION_CACHE_DIR" > "$OUT"', {**env, **extra})
        assert got.decode() == expected


def test_dry_run_prints_and_submits_nothing(tmp_path):
    from tests.pipeline_helpers import ndde

    out = ndde("submit", ROOT / "jobs" / "delayed_gradient.toml", "--run-dir", tmp_path / "r", "--dry-run",
               "--backend", "mpi", "--ntasks-per-node", "2", "--time", "00:30:00").stdout
    assert out.startswith("#!/bin/bash") and "#SBATCH --time=00:30:00" in out
    assert "#SBATCH --ntasks-per-node=2" in out and f"RUN_DIR={tmp_path / 'r'}" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_status_names_what_is_missing(tmp_path):
    """A directory that is no run directory is an error (it used to print 'not submitted');
    a submitted run where scontrol is not installed says so instead of a bare ENOENT."""
    from tests.pipeline_helpers import BIN, ndde

    missing = ndde("status", tmp_path / "nope", check=False)
    assert missing.returncode == 2 and f"{tmp_path / 'nope'} is not a run directory" in missing.stderr
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "job.toml").write_text((ROOT / "jobs" / "delayed_gradient.toml").read_text())
    assert "not submitted to Slurm" in ndde("status", tmp_path / "r").stdout
    (tmp_path / "r" / "slurm_job_id").write_text("4242\n")
    no_slurm = ndde("status", tmp_path / "r", check=False, env={"PATH": str(BIN)})
    assert no_slurm.returncode == 2 and "Slurm job 4242, but scontrol is not found" in no_slurm.stderr


def test_a_sweep_over_data_keys_gives_each_data_section_its_own_file(tmp_path):
    """Points of a grid over data.noise read one data file: their tasks generated it over each
    other. Each data section now has a file in the sweep directory; other grids keep the job's."""
    job = ROOT / "jobs" / "delayed_gradient.toml"
    jobs, _, _ = submit.plan_sweep(job, ["data.noise=0.0,0.1", "optimizer.learning_rate=1e-3,3e-3"], tmp_path / "sw",
                                   flags={"backend": "mpi"})
    assert [(j.data.noise, j.data.path) for j in jobs] == [
        (0.0, str(tmp_path / "sw" / "data-00.h5")), (0.0, str(tmp_path / "sw" / "data-00.h5")),
        (0.1, str(tmp_path / "sw" / "data-01.h5")), (0.1, str(tmp_path / "sw" / "data-01.h5"))]
    jobs, _, _ = submit.plan_sweep(job, ["optimizer.learning_rate=1e-3,3e-3"], tmp_path / "lr", flags={"backend": "mpi"})
    default = config.load(job).data_path.resolve()
    assert [pathlib.Path(j.data.path) for j in jobs] == [default, default]
    assert not (tmp_path / "sw").exists() and not (tmp_path / "lr").exists()  # planning writes nothing


def test_a_run_dir_that_is_a_file_is_named(tmp_path):
    """`--run-dir` naming a file failed with mkdir's bare "[Errno 17] File exists"."""
    from tests.pipeline_helpers import ndde, tiny_job

    (tmp_path / "afile").write_text("")
    job = tiny_job(tmp_path)
    for cmd in (["train", job], ["submit", job, "--backend", "mpi", "--dry-run"]):
        result = ndde(*cmd, "--run-dir", tmp_path / "afile", check=False)
        assert result.returncode == 2 and f"--run-dir {tmp_path / 'afile'} is a file, not a directory" in result.stderr
    # a path that cannot be made (below a file) is an error, not a NotADirectoryError traceback
    result = ndde("train", job, "--run-dir", tmp_path / "afile" / "run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"ndde train: error: [Errno 20] Not a directory: '{tmp_path / 'afile' / 'run'}'")
