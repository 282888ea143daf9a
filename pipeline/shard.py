"""One shard of a training step: the summed loss and gradient over this shard's part of the
batch. Every backend runs exactly this code (local in turn, Dask on workers, MPI on ranks),
so results agree up to the order in which shards are summed.

Shard w owns the contiguous block ``shard_bounds(n_train, shards, w)`` of the training rows
and reads only those. At step s it draws ``batch_size / shards`` of them without
replacement from ``numpy.random.default_rng([train.seed, s, w])``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import config as config_mod
from . import entry as entry_mod
from .data import read_rows, shard_bounds
from .models import build_model


class ShardResult(NamedTuple):
    shard: int
    loss_sum: float
    grad_sum: np.ndarray     # flat, in ravel_pytree order of theta
    steps: int
    rejected: int
    rhs_evals: int
    error: str               # "" when the step succeeded


def sample_loss(model, job, theta, sample, ts, throw=True):
    """The model's loss on one trajectory (``sample``: x0, ys, mask) and the solver's stats."""
    sol = model.solve(job, theta, {"x0": sample["x0"]}, ts, throw=throw)
    return model.loss(sol.ys, sample["ys"], sample["mask"]), sol.stats


@functools.lru_cache(maxsize=8)
def _compiled(config_text: str, expect: tuple):
    """(job, model, fast, checked): the shard's jitted value_and_grad twice. ``fast`` solves
    with throw=False: a solver failure gives NaN, and the program holds no host callback, so
    JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) can keep it for the next
    process of the job (a resume, a requeue, another worker). ``checked`` raises the solver's
    message; it is compiled only when a step comes out non-finite. ``expect``: entry.expected of
    the job as the root computed it (the key holds the code's digest, not only its path)."""
    job = config_mod.from_toml_text(config_text)
    model = build_model(job, dict(expect))
    _, unravel = ravel_pytree(model.theta0)

    def shard_loss(flat_theta, batch, ts, throw):
        theta = unravel(flat_theta)
        losses, stats = jax.vmap(lambda s: sample_loss(model, job, theta, s, ts, throw))(batch)
        return jnp.sum(losses), {k: jnp.sum(v) for k, v in stats.items()}

    step = lambda throw: jax.jit(jax.value_and_grad(functools.partial(shard_loss, throw=throw), has_aux=True))
    return job, model, step(False), step(True)


class ShardWorker:
    def __init__(self, config_text: str, data_path: str, shard: int, shards: int, expect: tuple = ()):
        # A solver failure inside the step is caught and reported by compute(); JAX's own
        # traceback log of the failing callback would only repeat it.
        logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
        self.job, self.model, self.fast, self.checked = _compiled(config_text, expect or _expected(config_text))
        self.shard, self.shards = shard, shards
        lo, hi = shard_bounds(self.job.data.n_train, shards, shard)
        self.size = hi - lo
        self.per = self.job.train.batch_size // shards
        rows = read_rows(data_path, self.job, lo, hi, self.model.dtype)
        self.ts = jnp.asarray(rows.pop("ts"))
        self.rows = rows

    def indices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.job.train.seed, step, self.shard])
        return np.sort(rng.choice(self.size, self.per, replace=False))

    def compute(self, flat_theta: np.ndarray, step: int) -> ShardResult:
        idx = self.indices(step)
        batch = {k: jnp.asarray(v[idx]) for k, v in self.rows.items()}
        theta = jnp.asarray(flat_theta, self.model.dtype)
        try:
            for fn in (self.fast, self.checked):  # checked only after a non-finite result: it raises
                (loss, stats), grad = fn(theta, batch, self.ts)  # the solver's message, if any
                loss, grad = float(loss), np.asarray(grad)
                if np.isfinite(loss) and np.all(np.isfinite(grad)):
                    break
        except Exception as err:  # solver failures (equinox runtime errors) end up here
            return ShardResult(self.shard, float("nan"), np.full(flat_theta.shape, np.nan), 0, 0, 0,
                               f"shard {self.shard}: {error_line(err)}")
        if os.environ.get("NDDE_TEST_NAN_AT_STEP") == str(step):  # fault injection for the NaN tests
            grad = grad * np.nan
        pause = os.environ.get("NDDE_TEST_PAUSE_AT_STEP", "")  # "STEP:SECONDS": a window to kill a step in
        if pause and pause.split(":")[0] == str(step):
            time.sleep(float(pause.split(":")[1]))
        return ShardResult(self.shard, loss, grad, int(stats["steps"]), int(stats["rejected"]),
                           int(stats["rhs_evals"]), "")


def error_line(err) -> str:
    """What a failed solve says, for a job's user: ndde's own message out of JAX's wrapped runtime
    error (after the host callback's traceback), with the job keys behind its advice."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = next((ln[ln.index("ndde:"):] for ln in lines if "ndde:" in ln), lines[0] if lines else type(err).__name__)
    return first.rstrip(".") + _job_keys(first) + "."


def _job_keys(message: str) -> str:
    """The job-file keys behind the solve() arguments a solver message asks to change."""
    keys = [f"solver.{k}" for k in ("max_steps", "history_size", "checkpoints", "rtol", "atol") if k in message]
    keys += ["solver.dtype"] if "solve in float64" in message else []
    return f" (in the job: {', '.join(keys)})" if keys else ""


_WORKERS: dict = {}


def _expected(config_text: str) -> tuple:
    return entry_mod.expected(config_mod.from_toml_text(config_text))


def worker_for(config_text: str, data_path: str, shard: int, shards: int, expect: tuple = ()) -> ShardWorker:
    """A process-wide cache: a Dask worker builds (and compiles) each shard once per version of
    the code. ``expect``: the root's entry.expected (default: this process's own digests)."""
    expect = expect or _expected(config_text)
    key = (config_text, expect, data_path, shard, shards)
    if key not in _WORKERS:
        _WORKERS[key] = ShardWorker(config_text, data_path, shard, shards, expect)
    return _WORKERS[key]
