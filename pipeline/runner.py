"""Start or resume a training run: resolve the job, make sure the data exists, pick the
backend, run the Trainer. The CLI and the tests call these two functions."""

from __future__ import annotations

import pathlib
import shutil
import sys
import warnings

from . import config as config_mod
from . import early_signals
from .backends import make_backend
from .checkpoint import CheckpointManager
from .data import DataError, ensure, read_rows, validate
from .entry import copy_into_run, in_run
from .entry import expected as entry_expected
from .models import build_model
from .runlock import only_run_in, training_now
from .train import Trainer, preempted_while_starting


def _mpi_prepare(job):
    """Before any JAX computation: this rank's GPU or (no GPU) its block of the node's cores."""
    from mpi4py import MPI

    from . import devices

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if devices.pin(node.Get_rank()) is None and job.backend.pin_cpus:
        devices.pin_cpus(node.Get_rank(), node.Get_size())
    return job.replace("backend", kind="mpi", workers=comm.Get_size()), comm


def _with_choices(job, backend, workers, scheduler, steps):
    """The job with the command line's choices (those not None) applied."""
    for section, changes in (("backend", {"kind": backend, "workers": workers, "scheduler": scheduler}),
                             ("train", {"steps": steps})):
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            job = job.replace(section, **changes)
    return job


def resolve(job, backend=None, workers=None, scheduler=None, steps=None):
    """Apply command-line choices to the job and check the result."""
    job = _with_choices(job, backend, workers, scheduler, steps)
    comm = None
    if job.backend.kind == "mpi":
        job, comm = _mpi_prepare(job)
    try:
        config_mod.check_consistent(job)
    except config_mod.ConfigError as err:
        if comm is not None and "backend.workers" in str(err):
            raise config_mod.ConfigError(f"{err} (under MPI, backend.workers is the number of ranks)") from None
        raise
    return job, comm


def _data(job, comm):
    """Generate (rank 0) and validate the data file; the job then names it by absolute path.
    Under MPI rank 0's refusal reaches every rank (each raises it; rank 0 reports it)."""
    if comm is None:
        path = ensure(job)
        return job.replace("data", path=str(path.resolve())), str(path.resolve())
    refused = None
    if comm.Get_rank() == 0:
        try:
            ensure(job)
        except (DataError, OSError) as err:
            refused = str(err)
    refused = comm.bcast(refused, root=0)
    if refused is not None:
        err = DataError(refused)
        err.root = comm.Get_rank() == 0
        raise err
    path = ensure(job)
    return job.replace("data", path=str(path.resolve())), str(path.resolve())


def _stop_if_signalled(comm, before_step):
    """Preempted (exit 75, nothing checkpointed) when SIGUSR1/SIGTERM came while starting."""
    name = early_signals.received()
    if comm is not None:
        name = next((n for n in comm.allgather(name) if n is not None), None)
    if name is not None:
        raise preempted_while_starting(name, before_step, comm is None or comm.Get_rank() == 0)


def _run(job, run_dir, comm, total_steps, restore, progress, extra_attrs=None, allow_model_change=False):
    job, data_path = _data(job, comm)  # a bad data file is refused before anything is written
    _stop_if_signalled(comm, "its first step")
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    made = not run_dir.exists()
    with only_run_in(run_dir, comm):
        try:
            return _run_locked(job, data_path, run_dir, comm, total_steps, restore, progress, extra_attrs,
                               allow_model_change)
        except BaseException:
            if fresh and (comm is None or comm.Get_rank() == 0):
                _remove_unused(run_dir, made)
            raise


def _remove_unused(run_dir: pathlib.Path, made: bool) -> None:
    """Undo a start that failed before training began (no job.toml written) in a run directory
    that was empty: the lock file (its holder is this process) and the directories the start
    made that stayed empty, ``run_dir`` itself when ``made``."""
    if not run_dir.is_dir() or (run_dir / "job.toml").exists():
        return
    (run_dir / ".lock").unlink(missing_ok=True)
    if (run_dir / "model").is_dir():
        shutil.rmtree(run_dir / "model")
    for path in sorted(run_dir.rglob("*"), reverse=True) + ([run_dir] if made else []):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def _install_model(job, run_dir, comm, data_path):
    """The job with its model's (and loss') file copied into RUN_DIR/model/ (by rank 0 under
    MPI; its refusal reaches every rank), checked against the data: rhs evaluated on x0 once."""
    refused = None
    if comm is None or comm.Get_rank() == 0:
        try:
            copy_into_run(job, run_dir)
        except (config_mod.ConfigError, OSError) as err:
            refused = err
    if comm is not None:
        refused = comm.bcast(refused, root=0)
    if refused is not None:
        refused.root = comm is None or comm.Get_rank() == 0
        raise refused
    job = copy_into_run(job, run_dir, write=False)
    _check_model_fits(job, data_path)
    return job


def _check_model_fits(job, data_path) -> None:
    """ConfigError unless the job's model builds and its rhs, evaluated once on the first
    trajectory's x0, returns the data's state shape, and a DDE is not asked for backsolve."""
    model = build_model(job)
    if model.model.is_dde and job.solver.sensitivity == "backsolve":
        raise config_mod.ConfigError(f"solver.sensitivity 'backsolve' works for ODEs only; model.entry "
                                     f"{job.model.entry!r} is a DDE (it has delays): use 'interpolating', "
                                     "'quadrature', 'backprop' or 'forward'")
    model.check_state(read_rows(data_path, job, 0, 1, model.dtype)["x0"][0])


def _run_locked(job, data_path, run_dir, comm, total_steps, restore, progress, extra_attrs, allow_model_change):
    job = _install_model(job, run_dir, comm, data_path)
    backend = make_backend(job.backend.kind, job.to_toml(), data_path, job.backend.workers,
                           job.backend.scheduler, log_dir=pathlib.Path(run_dir) / "dask-workers",
                           expect=entry_expected(job))
    try:
        _stop_if_signalled(comm, "its first step")
        trainer = Trainer(job, run_dir, backend, data_path, extra_attrs, allow_model_change)
        if not restore and backend.is_root:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "job.toml").write_text(job.to_toml())
        restored = trainer.restore_latest() if restore else None
        if restore and restored is None and backend.is_root:
            if trainer.manager.steps():
                warnings.warn(f"no checkpoint in {trainer.manager.directory} verifies; starting from step 0")
            else:
                print(f"ndde: no checkpoint yet in {trainer.manager.directory}; starting from step 0",
                      file=sys.stderr)
        summary = trainer.run(total_steps, restored, progress)
    finally:
        backend.close()
    summary["run_dir"] = str(run_dir)
    summary["root"] = backend.is_root
    return summary


def _fresh_run_dir(run_dir) -> pathlib.Path:
    run_dir = config_mod.new_run_dir(run_dir)
    newest = CheckpointManager(run_dir / "checkpoints").latest_step()
    if newest is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints (newest: step {newest}); continue it with "
                              f"`ndde resume {run_dir}` or choose another --run-dir")
    return run_dir


def dry_run(job, run_dir=None, *, backend=None, workers=None, scheduler=None, steps=None) -> str:
    """Check everything ``start`` checks before it writes (the job with the command line's
    choices, the run directory, an existing data file's layout) and write nothing. Returns
    what ``start`` would do; raises what it would raise."""
    job = _with_choices(job, backend, workers, scheduler, steps)
    config_mod.check_consistent(job)
    run_dir = _fresh_run_dir(run_dir or f"runs/{job.name}")
    holder = training_now(run_dir)
    if holder is not None:
        raise FileExistsError(f"{run_dir} is in use: {holder} is training it; choose another --run-dir")
    path = job.data_path
    if path.exists():
        validate(path, job)
        _check_model_fits(job, path)
        data = f"data {path} (exists, valid, fits the model)"
    else:
        data = f"data {path} (missing: would be generated)"
    return (f"ok: would train {job.name} for {job.train.steps} steps on backend {job.backend.kind} "
            f"({job.backend.workers} workers) in {run_dir}; {data}")


def start(job, run_dir=None, *, backend=None, workers=None, scheduler=None, steps=None, progress=True,
          extra_attrs=None) -> dict:
    job, comm = resolve(job, backend, workers, scheduler, steps)
    run_dir = _fresh_run_dir(run_dir or f"runs/{job.name}")
    return _run(job, run_dir, comm, job.train.steps, False, progress, extra_attrs)


def load_run_job(run_dir) -> config_mod.JobConfig:
    """RUN_DIR/job.toml, its entries' ``source`` the run's own copies (RUN_DIR/model/)."""
    path = config_mod.run_job_file(run_dir)
    return in_run(config_mod.load(path), path.parent)


def resume(run_dir, *, steps=None, backend=None, workers=None, scheduler=None, progress=True,
           extra_attrs=None, allow_model_change=False) -> dict:
    """Continue from the newest checkpoint that verifies, up to ``steps`` (default train.steps;
    the optimizer's schedule always follows the job's train.steps, and steps past a schedule whose
    learning rate has reached 0 are refused). ``allow_model_change``: resume although the
    run's model or loss file changed since the checkpoint (refused otherwise)."""
    run_dir = pathlib.Path(run_dir)
    job, comm = resolve(load_run_job(run_dir), backend, workers, scheduler)
    return _run(job, run_dir, comm, job.train.steps if steps is None else steps, True, progress, extra_attrs,
                allow_model_change)
