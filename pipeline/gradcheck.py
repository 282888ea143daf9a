"""``ndde gradcheck JOB``: every sensitivity method and central finite differences on the
job's model and loss for one training trajectory, as a table (float64, tight tolerances)."""

from __future__ import annotations

import jax.numpy as jnp

import solvers as sv

from .data import ensure, read_rows
from .models import build_model


def gradcheck(job, sample: int = 0, verbose: bool = False) -> sv.Comparison:
    """Gradient of the job's loss on training row ``sample`` w.r.t. the model's parameters
    and that row's initial data, by every applicable method."""
    if not 0 <= sample < job.data.n_train:
        raise ValueError(f"sample must be in [0, {job.data.n_train}), got {sample}")
    job = job.replace("solver", dtype="float64")
    model = build_model(job)
    rows = read_rows(ensure(job), job, sample, sample + 1, model.dtype)
    ts, ys, mask = jnp.asarray(rows["ts"]), jnp.asarray(rows["ys"][0]), jnp.asarray(rows["mask"][0])
    p = {"theta": model.theta0, "sample": {"x0": jnp.asarray(rows["x0"][0])}}
    s = job.solver
    return sv.compare_sensitivities(model.problem(ts[-1]), p, lambda y: model.loss(y, ys, mask), saveat=ts,
                                    rtol=min(s.rtol, 1e-10), atol=min(s.atol, 1e-12), verbose=verbose,
                                    max_steps=max(s.max_steps, 20_000))
