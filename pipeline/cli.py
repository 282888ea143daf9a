"""The `ndde` command: train, resume, data, report, inspect, gradcheck, submit, sweep, status."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import warnings

from . import early_signals

EXIT_CONFIG, EXIT_TRAINING = 2, 3


def _train(args):
    from . import config, runner

    job = config.load(args.job, args.set)
    if args.dry_run:
        print(runner.dry_run(job, args.run_dir, backend=args.backend, workers=args.workers, scheduler=args.scheduler,
                             steps=args.steps))
        return 0
    summary = runner.start(job, args.run_dir, backend=args.backend, workers=args.workers,
                           scheduler=args.scheduler, steps=args.steps)
    return _print_summary(summary)


def _print_summary(summary):
    if summary.pop("root"):
        print(json.dumps(summary))
    return 0


def _resume(args):
    from . import runner

    summary = runner.resume(args.run_dir, steps=args.steps, backend=args.backend, workers=args.workers,
                            scheduler=args.scheduler, allow_model_change=args.allow_model_change)
    return _print_summary(summary)


def _data(args):
    from . import config, data

    job = config.load(args.job, args.set)
    target = args.out or job.data_path
    existing = None if args.force else data.existing_file_for(job, target)
    if existing == "":
        print(f"{target} is up to date: generated for this data section already (kept; --force regenerates it)")
        return 0
    if existing:
        raise data.DataError(existing)
    path = data.generate(job, target)
    info = data.validate(path, job)
    print(f"wrote {path}: {info['n']} trajectories x {info['n_times']} times of a {info['dim']}-d state "
          f"({job.data.system})")
    return 0


def _report(args):
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def _inspect(args):
    from .inspect import describe

    print(describe(args.file))
    return 0


def _gradcheck(args):
    from . import config
    from .gradcheck import gradcheck

    comparison = gradcheck(config.load(args.job, args.set), sample=args.sample)
    print(comparison.table())
    failed = tuple(comparison.errors)
    print(f"worst relative difference between methods{' that ran' if failed else ''}: "
          f"{comparison.worst(exclude=failed):.2e}")
    return 1 if failed else 0


def _submit(args):
    from . import config, submit

    job = submit.apply_flags(config.load(args.job, args.set), **_slurm_flags(args))
    script, job_id = submit.submit(job, args.run_dir or f"runs/{job.name}", dry_run=args.dry_run)
    print(script if args.dry_run else f"submitted {args.run_dir or 'runs/' + job.name}/job.sbatch\n{job_id}")
    return 0


def _sweep(args):
    from . import config, submit

    name = config.load(args.job, args.set).name
    script, job_id = submit.sweep(args.job, args.grid, args.sweep_dir or f"runs/{name}-sweep", args.set,
                                  _slurm_flags(args), dry_run=args.dry_run)
    print(script if args.dry_run else job_id)
    return 0


def _status(args):
    from .submit import status

    print(status(args.run_dir))
    return 0


def _slurm_flags(args):
    return {k: getattr(args, k) for k in ("backend", "steps", "nodes", "ntasks_per_node", "gpus_per_node", "time",
                                          "partition")}


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, workers or nodes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_slurm_flags(p):
    p.add_argument("--backend", choices=("mpi", "dask"), help="override backend.kind")
    p.add_argument("--steps", type=_positive, help="override train.steps")
    p.add_argument("--nodes", type=_positive, help="override slurm.nodes")
    p.add_argument("--ntasks-per-node", type=_positive, help="override slurm.ntasks_per_node (ranks or workers)")
    p.add_argument("--gpus-per-node", type=int, help="override slurm.gpus_per_node")
    p.add_argument("--time", help="override slurm.time, e.g. 02:00:00")
    p.add_argument("--partition", help="override slurm.partition")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")


def _add_backend_flags(p, with_steps_help):
    p.add_argument("--backend", choices=("local", "dask", "dask-slurm", "mpi"), help="override backend.kind")
    p.add_argument("--workers", type=_positive, help="override backend.workers (dask workers / local shards)")
    p.add_argument("--scheduler", help="dask: tcp://host:port of an existing scheduler")
    p.add_argument("--steps", type=_positive, help=with_steps_help)


class _Parser(argparse.ArgumentParser):
    """Refusals in one line (``ndde train: error: ...``) and exit 2, like every other refusal."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ndde", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train a job (generates its data file first if missing)")
    p.add_argument("job", help="job TOML file, e.g. jobs/hnn_pendulum.toml")
    p.add_argument("--run-dir", help="run directory (default runs/<job name>)")
    _add_backend_flags(p, "override train.steps")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one job key (TOML value), repeatable")
    p.add_argument("--dry-run", action="store_true", help="check the job, run directory and data; write nothing")
    p.set_defaults(func=_train)
    p = sub.add_parser("submit", help="render RUN_DIR/job.sbatch and submit it with sbatch (prints the job id)")
    p.add_argument("job")
    p.add_argument("--run-dir", help="run directory (default runs/<job name>)")
    _add_slurm_flags(p)
    p.set_defaults(func=_submit)
    p = sub.add_parser("sweep", help="submit one Slurm job array over a grid of job values")
    p.add_argument("job")
    p.add_argument("--grid", action="append", required=True, metavar="SECTION.KEY=V1,V2,...")
    p.add_argument("--sweep-dir", help="parent of the run directories (default runs/<job name>-sweep)")
    _add_slurm_flags(p)
    p.set_defaults(func=_sweep)
    p = sub.add_parser("status", help="Slurm state and newest checkpoint of a submitted run")
    p.add_argument("run_dir")
    p.set_defaults(func=_status)
    p = sub.add_parser("resume", help="continue a run from its newest checkpoint that verifies")
    p.add_argument("run_dir")
    _add_backend_flags(p, "stop at this step (default train.steps)")
    p.add_argument("--allow-model-change", action="store_true",
                   help="resume although the run's model or loss file (RUN_DIR/model/) changed since the checkpoint")
    p.set_defaults(func=_resume)
    p = sub.add_parser("data", help="generate a job's HDF5 data file")
    p.add_argument("job")
    p.add_argument("--out", help="file to write (default: the job's data.path)")
    p.add_argument("--force", action="store_true", help="overwrite a file that holds other data")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=_data)
    p = sub.add_parser("report", help="write RUN_DIR/report.png: loss, held-out fit, learned tau")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)
    p = sub.add_parser("inspect", help="describe an ndde HDF5 file (checkpoint or data)")
    p.add_argument("file")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("gradcheck", help="compare every sensitivity method and finite differences on the job")
    p.add_argument("job")
    p.add_argument("--sample", type=int, default=0, help="training row whose loss is differentiated")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=_gradcheck)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    training = args.command in ("train", "resume") and not getattr(args, "dry_run", False)
    # before the imports below and the start-up, which take seconds
    with early_signals.caught() if training else contextlib.nullcontext():
        return _main(args)


def _main(args) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .devices import world_rank
    from .submit import SubmitError
    from .train import Preempted, ResumeError, RunStopped

    warnings.simplefilter("default")
    try:
        return args.func(args)
    except (ConfigError, DataError, ResumeError, CheckpointError, OSError, SubmitError) as err:
        # OSError: a path that cannot be written or read (permissions, a full disk, a missing
        # directory), FileExistsError and FileNotFoundError included
        # a job file's ConfigError comes alike on every MPI rank, before MPI starts: rank 0 reports it
        if getattr(err, "root", not isinstance(err, ConfigError) or world_rank() in (None, 0)):
            print(f"ndde {args.command}: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RunStopped as err:  # a failed step or a signal
        if err.root:  # not once per MPI rank
            print(f"ndde {args.command}: {err}", file=sys.stderr)
        return err.exit_code if isinstance(err, Preempted) else EXIT_TRAINING
    except KeyboardInterrupt:  # Ctrl-C before training began, or twice during it
        print(f"\nndde {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
