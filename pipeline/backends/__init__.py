"""Where the shards of a training step run: ``local`` (this process, in turn), ``dask``
(an embedded LocalCluster or a scheduler address), ``dask-slurm`` (dask-jobqueue's
SLURMCluster: each worker a Slurm job), ``mpi`` (one shard per rank).

A backend's ``step(flat_theta, step, stopping)`` returns the reduced step (``Reduced``) on
every process that runs the training loop; ``is_root`` says which process writes files.
``stopping()`` names the stop signal received (SIGTERM, ...) or is None; a backend whose
shards can be lost (dask) raises ``StepAbandoned`` rather than wait without bound.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Reduced(NamedTuple):
    loss_per_shard: np.ndarray
    grad_sum: np.ndarray
    steps: int
    rejected: int
    rhs_evals: int
    errors: list


class StepAbandoned(RuntimeError):
    """A step that cannot finish: its shards' workers are gone (for longer than
    backend.worker_timeout, or at all after a stop signal). The parameters are those of the
    step before it, which the caller checkpoints."""


class DriverBackend:
    """A backend whose training loop runs in one process (local, dask): it is the root, and
    collective helpers are identities."""

    is_root = True
    rank = 0

    def barrier(self):
        pass

    def broadcast(self, value):
        return value

    def agree(self, value):
        return value

    def close(self):
        pass


def reduce_in_order(results) -> Reduced:
    """Sum shard results in shard order (a fixed order: the same bits on every backend)."""
    results = sorted(results, key=lambda r: r.shard)
    grad = results[0].grad_sum.copy()
    for r in results[1:]:
        grad = grad + r.grad_sum
    return Reduced(np.array([r.loss_sum for r in results]), grad, sum(r.steps for r in results),
                   sum(r.rejected for r in results), sum(r.rhs_evals for r in results),
                   [r.error for r in results if r.error])


def make_backend(kind: str, config_text: str, data_path: str, workers: int, scheduler: str = "", log_dir=None,
                 expect: tuple = ()):
    """log_dir: where dask-slurm worker jobs write their Slurm output (default: the cwd);
    expect: entry.expected of the job (every shard refuses entry files of other digests)."""
    if kind == "local":
        from .local import LocalBackend
        return LocalBackend(config_text, data_path, workers, expect)
    if kind in ("dask", "dask-slurm"):
        from .dask_backend import DaskBackend
        return DaskBackend(config_text, data_path, workers, scheduler, on_slurm=kind == "dask-slurm", log_dir=log_dir,
                           expect=expect)
    if kind == "mpi":
        from .mpi_backend import MpiBackend
        return MpiBackend(config_text, data_path, expect)
    raise ValueError(f"unknown backend {kind!r}; use local, dask, dask-slurm or mpi")
