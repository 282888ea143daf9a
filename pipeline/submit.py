"""Slurm submission: render ``slurm/ndde.sbatch.in`` (a pure function of the job and the
paths), submit it with ``sbatch``, and sweep a grid as one job array.

Nothing from a job file or a flag reaches the shell unquoted: #SBATCH values are checked
against patterns in ``config.SlurmConfig``; paths go through ``shlex.quote`` in shell lines
and are refused in #SBATCH lines if they hold a double quote or a line break.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import shlex
import shutil
import subprocess
import sys

from . import config as config_mod
from .checkpoint import CheckpointManager
from .entry import copy_into_run, sources
from .runlock import training_now

TEMPLATE = pathlib.Path(__file__).resolve().parent.parent / "slurm" / "ndde.sbatch.in"


class SubmitError(RuntimeError):
    """sbatch/squeue failed or a value cannot be put into a batch script safely."""


def _directive_path(path) -> str:
    text = str(path)
    if any(c in text for c in '"\n\r\0'):
        raise config_mod.ConfigError(f"path {text!r} cannot go into an #SBATCH line (it holds a double quote "
                                     "or a line break); choose another run directory")
    return f'"{text}"'


def workers_of(job) -> int:
    return job.slurm.nodes * job.slurm.ntasks_per_node


def render_sbatch(job, run_dirs, output, ndde_bin, template: str | None = None, scontrol: str = "scontrol",
                  hostname: str = "hostname") -> str:
    """The batch script for ``job`` (its [slurm] section, already merged with flags) training
    in ``run_dirs`` (one, or one per array task), Slurm output to ``output``; ``scontrol`` and
    ``hostname`` as the script calls them (absolute paths found at submit time, see ``tools``)."""
    s, run_dirs = job.slurm, [pathlib.Path(d) for d in run_dirs]
    lines = [f"--job-name={s.job_name or job.name}", f"--output={_directive_path(output)}",
             f"--nodes={s.nodes}", f"--ntasks-per-node={s.ntasks_per_node}", f"--cpus-per-task={s.cpus_per_task}"]
    if s.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    for flag, value in (("mem", s.mem), ("time", s.time), ("partition", s.partition), ("account", s.account),
                        ("qos", s.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [f"--signal=B:USR1@{s.signal_grace}", "--requeue", "--open-mode=append"]
    if len(run_dirs) > 1:
        lines.append(f"--array=0-{len(run_dirs) - 1}")
    lines += list(s.extra)
    directives = "\n".join(f"#SBATCH {line}" for line in lines)
    if len(run_dirs) == 1:
        select = f"RUN_DIR={shlex.quote(str(run_dirs[0]))}"
    else:
        select = ("RUN_DIRS=(" + " ".join(shlex.quote(str(d)) for d in run_dirs) + ")\n"
                  'RUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"')
    bindir = pathlib.Path(ndde_bin).parent
    if job.backend.kind == "mpi" and s.launcher == "srun":
        launch = 'srun --kill-on-bad-exit=1 "$NDDE" resume "$RUN_DIR"'
    elif job.backend.kind == "mpi":
        launch = f'{shlex.quote(str(bindir / "mpiexec"))} -n "$SLURM_NTASKS" "$NDDE" resume "$RUN_DIR"'
    else:
        launch = '"$NDDE" resume "$RUN_DIR"'
    text = TEMPLATE.read_text() if template is None else template
    return text.format(directives=directives, grace=s.signal_grace, select_run_dir=select,
                       ndde=shlex.quote(str(ndde_bin)), launch=launch, scontrol=shlex.quote(scontrol),
                       hostname=shlex.quote(hostname))


def tools() -> dict:
    """scontrol and hostname by the absolute paths this machine's PATH gives them (a job's
    environment cannot then put another program in their place); bare names where absent."""
    return {name: shutil.which(name) or name for name in ("scontrol", "hostname")}


def apply_flags(job, *, backend=None, steps=None, nodes=None, ntasks_per_node=None, gpus_per_node=None,
                time=None, partition=None):
    flags = {"nodes": nodes, "ntasks_per_node": ntasks_per_node, "gpus_per_node": gpus_per_node, "time": time,
             "partition": partition}
    changes = {k: v for k, v in flags.items() if v is not None}
    if changes:
        job = job.replace("slurm", **changes)
    if backend is not None:
        job = job.replace("backend", kind=backend)
    if job.backend.kind not in ("mpi", "dask"):
        raise config_mod.ConfigError(f"backend.kind must be 'mpi' or 'dask' for `ndde submit`, got "
                                     f"{job.backend.kind!r}")
    if steps is not None:
        job = job.replace("train", steps=steps)
    job = job.replace("backend", workers=workers_of(job))
    if job.backend.kind == "dask" and job.slurm.nodes != 1:
        raise config_mod.ConfigError("backend 'dask' runs a LocalCluster inside one allocation: slurm.nodes must "
                                     "be 1 (use backend 'dask-slurm' from a login node for several nodes)")
    job = job.replace("data", path=str(job.data_path.resolve()))
    for section, path in sources(job).items():  # the batch job finds the entry files wherever it starts
        job = job.replace(section, source=str(path))
    return job


def check_run_dir_free(job, run_dir) -> pathlib.Path:
    """``run_dir`` as an absolute path. Refused (FileExistsError) when it is training now; when it
    holds checkpoints or was submitted before (a job may be queued for it), refused unless its
    job.toml is this job but for the [slurm] section (a submit that continues the run)."""
    run_dir = config_mod.new_run_dir(run_dir).resolve()
    holder = training_now(run_dir)
    if holder is not None:
        raise FileExistsError(f"{run_dir} is training now ({holder}); wait for it (`ndde status {run_dir}`), stop "
                              "it, or choose another --run-dir")
    newest = CheckpointManager(run_dir / "checkpoints").latest_step()
    submitted = (run_dir / "slurm_job_id").exists()
    if newest is None and not submitted:
        return run_dir
    what = (f"holds checkpoints (newest: step {newest})" if newest is not None else
            "was submitted before (slurm_job_id)")
    job_file = run_dir / "job.toml"
    if not job_file.is_file():
        raise FileExistsError(f"{run_dir} {what} but has no job.toml; choose another --run-dir")
    try:
        old = config_mod.load(job_file)
    except config_mod.ConfigError as err:
        raise FileExistsError(f"{run_dir} {what}; its job.toml does not load ({err}); choose another "
                              "--run-dir") from None
    diffs = config_mod.differences(old, job, [s for s in config_mod.SECTIONS if s != "slurm"]) + (
        [f"name: {old.name!r} -> {job.name!r}"] if old.name != job.name else [])
    if diffs:
        raise FileExistsError(f"{run_dir} {what} under another job ({'; '.join(diffs)}); submitting into it would "
                              "change the run: choose another --run-dir, or submit its own job.toml to continue it")
    return run_dir


def _write_job(job, run_dir) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.toml").write_text(job.to_toml())


def ndde_bin() -> pathlib.Path:
    return pathlib.Path(sys.executable).parent / "ndde"


def sbatch(script_path) -> str:
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: is this a Slurm login node? (slurm/local-cluster.sh start "
                          "brings up a single-node Slurm here)")
    result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def submit(job, run_dir, dry_run=False) -> tuple[str, str | None]:
    """Render the batch script; unless ``dry_run`` (which writes nothing), write RUN_DIR/job.toml,
    RUN_DIR/model/ (a fresh run's copy of its entry files) and RUN_DIR/job.sbatch and submit.
    Returns (script, job id or None). Everything is checked before anything is written."""
    config_mod.check_consistent(job)
    run_dir = check_run_dir_free(job, run_dir)
    script = render_sbatch(job, [run_dir], run_dir / "slurm-%j.out", ndde_bin(), **tools())
    if dry_run:
        return script, None
    # the queued job imports the run directory's copy of the model; a continued run keeps its own
    fresh = CheckpointManager(run_dir / "checkpoints").latest_step() is None
    _write_job(copy_into_run(job, run_dir, write=fresh), run_dir)
    (run_dir / "job.sbatch").write_text(script)
    job_id = sbatch(run_dir / "job.sbatch")
    (run_dir / "slurm_job_id").write_text(job_id + "\n")
    return script, job_id


def grid_points(grid: list[str]) -> list[list[str]]:
    """``section.key=v1,v2`` options -> the list of override lists of their product."""
    axes = []
    for text in grid:
        section, key, _ = config_mod.parse_override(text.split(",")[0])
        values = text.split("=", 1)[1].split(",")
        axes.append([f"{section}.{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def _data_file_per_section(jobs, sweep_dir):
    """Points whose data sections differ (a grid over data.noise, say) but name one data file
    get a file per section in the sweep directory: sharing one, the tasks generated it over each
    other and all but one were refused (or trained on another section's data)."""
    section = lambda job: dataclasses.replace(job.data, path="")
    by_path = {}
    for job in jobs:
        by_path.setdefault(job.data_path, set()).add(section(job))
    order = list(dict.fromkeys(section(job) for job in jobs))
    return [job if len(by_path[job.data_path]) == 1 else
            job.replace("data", path=str(sweep_dir / f"data-{order.index(section(job)):02d}.h5")) for job in jobs]


def _same_allocation(jobs, points) -> None:
    """One job array has one set of #SBATCH lines and one launcher: refuse a grid whose points
    differ in [slurm] or [backend], naming the first key that does."""
    for job, point in zip(jobs[1:], points[1:]):
        diffs = config_mod.differences(jobs[0], job, ("slurm", "backend"))
        if diffs:
            raise config_mod.ConfigError(
                f"a sweep is one Slurm job array, so [slurm] and [backend] must be the same for every point; "
                f"point {' '.join(point)} changes {diffs[0]}. Submit one sweep per value of that key instead")


def plan_sweep(job_path, grid, sweep_dir, base_overrides=(), flags=None):
    """(jobs, run dirs, batch script) of a sweep, checked, nothing written: one run directory per
    grid point (``point-000``...), one array job over them."""
    sweep_dir = pathlib.Path(sweep_dir).resolve()
    points = grid_points(grid)
    jobs = [apply_flags(config_mod.load(job_path, [*base_overrides, *point]), **(flags or {})) for point in points]
    _same_allocation(jobs, points)
    jobs = _data_file_per_section(jobs, sweep_dir)
    for job in jobs:
        config_mod.check_consistent(job)
    run_dirs = [check_run_dir_free(job, sweep_dir / f"point-{i:03d}") for i, job in enumerate(jobs)]
    script = render_sbatch(jobs[0], run_dirs, sweep_dir / "slurm-%A_%a.out", ndde_bin(), **tools())
    return jobs, run_dirs, script


def sweep(job_path, grid, sweep_dir, base_overrides=(), flags=None, dry_run=False):
    """Plan the sweep (``plan_sweep``); unless ``dry_run`` (which writes nothing), write its run
    directories (each with its job.toml and its copy of the entry files, RUN_DIR/model/), ``sweep.sbatch`` and ``points.txt`` and submit. Returns (script, job id or None)."""
    jobs, run_dirs, script = plan_sweep(job_path, grid, sweep_dir, base_overrides, flags)
    if dry_run:
        return script, None
    sweep_dir = pathlib.Path(sweep_dir).resolve()
    for job, run_dir in zip(jobs, run_dirs):  # each point trains the model as it was at submission
        fresh = CheckpointManager(run_dir / "checkpoints").latest_step() is None
        _write_job(copy_into_run(job, run_dir, write=fresh), run_dir)
    (sweep_dir / "sweep.sbatch").write_text(script)
    (sweep_dir / "points.txt").write_text("".join(f"{d.name} {' '.join(p)}\n" for d, p in
                                                 zip(run_dirs, grid_points(grid))))
    return script, sbatch(sweep_dir / "sweep.sbatch")


def status(run_dir) -> str:
    run_dir = config_mod.run_job_file(run_dir).parent
    lines = [f"run {run_dir}"]
    id_file = run_dir / "slurm_job_id"
    if id_file.exists():
        job_id = id_file.read_text().strip()
        if shutil.which("scontrol") is None:
            raise SubmitError(f"{run_dir} was submitted as Slurm job {job_id}, but scontrol is not found here: "
                              "run `ndde status` where Slurm's commands are (a login node)")
        result = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
        fields = dict(tok.split("=", 1) for tok in result.stdout.split() if "=" in tok)
        state = fields.get("JobState", "unknown (no longer known to slurmctld)")
        lines.append(f"slurm job {job_id}: {state}, restarts {fields.get('Restarts', '?')}, "
                     f"reason {fields.get('Reason', '?')}")
    else:
        lines.append("not submitted to Slurm (no slurm_job_id file)")
    holder = training_now(run_dir)
    lines.append(f"training now: {holder}" if holder else f"not training now (no process holds {run_dir / '.lock'})")
    manager = CheckpointManager(run_dir / "checkpoints")
    step = manager.latest_valid_step()
    lines.append(f"newest checkpoint: {manager.path(step) if step is not None else 'none'}")
    return "\n".join(lines)
