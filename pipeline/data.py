"""Trajectory data in HDF5: generated from known systems with the solvers at tight
tolerance, or a user's file of the same layout.

Layout (N trajectories, n save times, state size d):

* ``ts`` (n,) strictly increasing, ``ts[0] = 0``
* ``ys`` (N, n, d) observed states at ``ts``; NaN marks a missing observation (masked out of
  the loss)
* ``x0`` (N, d) initial states (a DDE model's default history is the constant x0)

These three are all a user's file needs; d, the state size, is the model's. Generated files
also hold ``history`` (N, d), the generating system's history parameters (read by no model),
and root attrs ``format = "ndde-data"``, ``version = 1``, ``system`` and ``system_params``
(JSON of the generating parameters). Rows ``[0, n_train)`` train, the next ``n_test`` are
held out. Each worker reads only its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import stat
import uuid

import h5py
import jax
import jax.numpy as jnp
import numpy as np

import solvers as sv

from .config import JobConfig

TRUE_PARAMS = {
    "pendulum": {"H": "p^2/2 + 1 - cos q"},
    "mackey_glass": {"beta": 2.0, "gamma": 1.0, "power": 10.0, "tau": 2.0},
    "delayed_gradient": {"V": "(x1^2 + x1^4/2)/2 + x2^2", "tau": 0.5, "v": [0.5, -0.3]},
}
GEN_RTOL, GEN_ATOL, GEN_MAX_STEPS = 1e-10, 1e-12, 100_000


class DataError(ValueError):
    """A data file that does not have the layout a job needs."""


def _initial_conditions(system, n, rng):
    if system == "pendulum":
        return np.stack([rng.uniform(-1.5, 1.5, n), rng.uniform(-1.0, 1.0, n)], axis=1), None
    if system == "mackey_glass":
        c = rng.uniform(0.3, 1.3, (n, 1))
        return c.copy(), c
    x0 = rng.uniform(-1.0, 1.0, (n, 2))
    return x0.copy(), x0


def _problem(system, t1):
    tp = TRUE_PARAMS[system]
    if system == "pendulum":
        rhs = lambda t, x, p: jnp.stack([x[1], -jnp.sin(x[0])])
        return sv.ODEProblem(rhs, x0=lambda p: p["x0"], t0=0.0, t1=t1)
    if system == "mackey_glass":
        rhs = lambda t, x, lag, p: tp["beta"] * lag[0] / (1 + lag[0] ** tp["power"]) - tp["gamma"] * x
        history = lambda t, p: p["history"] + 0.0 * t
    else:
        v = jnp.asarray(tp["v"])
        rhs = lambda t, x, lag, p: -jnp.stack([lag[0][0] + lag[0][0] ** 3, 2.0 * lag[0][1]])
        history = lambda t, p: p["history"] + t * v
    return sv.DDEProblem(rhs, history, lambda p: jnp.array([tp["tau"]]), 0.0, t1)


def generate(job: JobConfig, path=None) -> pathlib.Path:
    """Solve the job's data system for n_train + n_test initial conditions and write the file.
    The solve runs in float64 without switching the process to it (a float32 job trained in the
    same process built float64 weights and failed)."""
    d = job.data
    path = pathlib.Path(path or job.data_path)
    if not d.system:
        raise DataError("the job generates no data: data.system is empty (set it to one of pendulum, mackey_glass, "
                        "delayed_gradient to generate data, or give data.path of your own file)")
    n = d.n_train + d.n_test
    rng = np.random.default_rng(d.seed)
    try:
        x0, hist = _initial_conditions(d.system, n, rng)
    except MemoryError:
        raise DataError(f"generating {path}: data.n_train + data.n_test = {n} trajectories do not fit in "
                        "memory; choose fewer") from None
    ts = np.linspace(0.0, d.t1, d.n_times)
    with jax.enable_x64(True):
        prob = _problem(d.system, d.t1)
        p = {"x0": jnp.asarray(x0)} | ({"history": jnp.asarray(hist)} if hist is not None else {})
        one = lambda p: sv.solve(prob, p, saveat=jnp.asarray(ts), rtol=GEN_RTOL, atol=GEN_ATOL,
                                 max_steps=GEN_MAX_STEPS, throw=False).ys
        ys = np.asarray(jax.jit(jax.vmap(one))(p))
    failed = ~np.all(np.isfinite(ys), axis=(1, 2))
    if failed.any():
        raise DataError(f"generating {path}: the {d.system} solve failed for {int(failed.sum())} of {n} trajectories "
                        f"(no finite solution within {GEN_MAX_STEPS} steps at rtol {GEN_RTOL} up to data.t1 = "
                        f"{d.t1!r}); choose a shorter data.t1")
    if d.noise > 0:
        with np.errstate(over="ignore"):  # an overflow is refused just below, in one line
            ys = ys + d.noise * rng.standard_normal(ys.shape)
        if not np.all(np.isfinite(ys)):
            raise DataError(f"generating {path}: data.noise = {d.noise!r} makes observations overflow to inf; "
                            "choose a smaller data.noise")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: several processes (the tasks of a sweep array) may generate the same
    # file at once; each writes identical contents and the last atomic rename wins.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f["ts"], f["ys"], f["x0"] = ts, ys, x0
            if hist is not None:
                f["history"] = hist
            f.attrs.update({"format": "ndde-data", "version": 1, "system": d.system,
                            "system_params": json.dumps(TRUE_PARAMS[d.system]), "rtol": GEN_RTOL,
                            "atol": GEN_ATOL, "seed": d.seed, "noise": d.noise})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


REQUIRED = ("ts", "ys", "x0")


def validate(path, job: JobConfig) -> dict:
    """Check the file's layout against the job; returns its sizes. Raises DataError naming
    the missing or misshapen dataset."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist (create it with `ndde data JOB.toml`)")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError(f"data file {path} is not a regular file (a directory, FIFO or device): give an HDF5 file")
    d = job.data
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"data file {path} is not a readable HDF5 file: {err}") from None
    with f:
        for name in REQUIRED:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise DataError(f"data file {path} has no dataset {name!r} (needs {', '.join(REQUIRED)})")
            if f[name].dtype.kind not in "fiu":
                raise DataError(f"data file {path}: dataset {name!r} holds {f[name].dtype} values; it must hold real "
                                "numbers (float or integer)")
        ts, ys = f["ts"][...], f["ys"]
        n, dim = (ys.shape[0], ys.shape[2]) if ys.ndim == 3 else (-1, "d")
        expect = {"ys": (n, ts.shape[0], dim), "x0": (n, dim)}
        for name in REQUIRED[1:]:
            if f[name].shape != expect[name] or n < 1:
                raise DataError(f"data file {path}: dataset {name!r} has shape {f[name].shape}, expected "
                                f"(N, {', '.join(map(str, expect[name][1:]))}) with N >= 1 (ts has "
                                f"{ts.shape[0] if ts.ndim == 1 else ts.shape} times)")
        if ts.ndim != 1 or ts.shape[0] < 2 or ts[0] != 0.0 or np.any(np.diff(ts) <= 0):
            raise DataError(f"data file {path}: 'ts' must be 1-D, strictly increasing, starting at 0")
        if n < d.n_train + d.n_test:
            raise DataError(f"data file {path} holds {n} trajectories; the job needs data.n_train + "
                            f"data.n_test = {d.n_train + d.n_test}")
        for name in REQUIRED:
            values = f[name][...]
            bad = np.isinf(values) if name == "ys" else ~np.isfinite(values)
            if np.any(bad):
                raise DataError(f"data file {path}: dataset {name!r} contains "
                                f"{'inf' if name == 'ys' else 'NaN or inf'} (only ys may hold NaN: a missing "
                                "observation)")
        if np.any(np.all(np.isnan(f["ys"][:d.n_train + d.n_test]), axis=(1, 2))):
            raise DataError(f"data file {path}: dataset 'ys' has a trajectory with no observation (all NaN)")
        if f.attrs.get("format") == "ndde-data":
            _check_generated_for(d, dict(f.attrs), ts, path)
    return {"n": n, "n_times": ts.shape[0], "dim": dim}


def _check_generated_for(d, attrs, ts, path):
    """A file that ``ndde data`` wrote records the data section it was made for; a job whose
    section differs would train on other data than it says (a changed noise, t1 or seed)."""
    missing = [k for k in ("system", "noise", "seed") if k not in attrs]
    if missing:
        raise DataError(f"data file {path} says format = 'ndde-data' but lacks the attrs {', '.join(missing)} that "
                        "`ndde data` writes: regenerate it with `ndde data JOB.toml --force`, or remove its "
                        "'format' attr to use it as your own data")
    try:
        made = {"system": str(attrs["system"]), "t1": float(ts[-1]), "n_times": int(ts.shape[0]),
                "noise": float(attrs["noise"]), "seed": int(attrs["seed"])}
    except (TypeError, ValueError) as err:
        raise DataError(f"data file {path}: an attr that `ndde data` writes has the wrong type ({err})") from None
    diffs = [f"data.{k} = {getattr(d, k)!r}, the file's {v!r}" for k, v in made.items() if getattr(d, k) != v]
    if diffs:
        raise DataError(f"data file {path} was generated for another data section ({'; '.join(diffs)}): "
                        "regenerate it with `ndde data JOB.toml --force` (overwrites it) or set data.path to a new file")


def digest(path) -> str:
    """sha256 of the datasets a run reads (changes to the data are refused on resume)."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for name in ("ts", "ys", "x0", "history"):
            if name in f:
                h.update(name.encode() + np.ascontiguousarray(f[name][...]).tobytes())
    return h.hexdigest()


def read_rows(path, job: JobConfig, lo: int, hi: int, dtype) -> dict:
    """Rows [lo, hi) as arrays: ts, ys (0 where missing), mask (True where observed), x0."""
    with h5py.File(path, "r") as f:
        ts, ys, x0 = f["ts"][...], f["ys"][lo:hi], f["x0"][lo:hi]
    mask = ~np.isnan(ys)
    return {"ts": np.asarray(ts, dtype), "ys": np.asarray(np.where(mask, ys, 0.0), dtype), "mask": mask,
            "x0": np.asarray(x0, dtype)}


def shard_bounds(n_train: int, shards: int, shard: int) -> tuple[int, int]:
    """Contiguous block of the training rows owned by ``shard`` (sizes differ by at most 1)."""
    edges = np.linspace(0, n_train, shards + 1).round().astype(int)
    return int(edges[shard]), int(edges[shard + 1])


def existing_file_for(job: JobConfig, path) -> str | None:
    """None when ``path`` is missing; "" when it holds what `ndde data` would write for the job
    (generated for its data section, same size); else why overwriting it would lose something."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    keep = ("pass --force to overwrite it (a run trained on it can then no longer resume), or --out "
            "to write elsewhere")
    try:
        info = validate(path, job)
    except DataError as err:
        text = str(err)
        return text if "--force" in text else f"{text}; {keep}"
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != "ndde-data":
            return f"{path} holds data that `ndde data` did not write (your own?): {keep}"
    n = job.data.n_train + job.data.n_test
    return "" if info["n"] == n else f"{path} holds {info['n']} trajectories, the job makes {n}: {keep}"


def ensure(job: JobConfig) -> pathlib.Path:
    """The job's data file, generated first if it is missing; validated."""
    path = job.data_path
    if not path.exists():
        if not job.data.system:
            raise DataError(f"data file {path} does not exist, and the job generates no data (data.system is "
                            "empty): give data.path of your file (relative to the job file)")
        generate(job, path)
    validate(path, job)
    return path
