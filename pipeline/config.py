"""Job configuration: a TOML file parsed into frozen dataclasses.

This is the only place where strings from a job file become choices. Every key is
checked: an unknown key, a wrong type or an out-of-range value is a ``ConfigError``
that names the key (``section.key``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib
import re
import tomllib
from typing import Any

from .zoo import SHIPPED, SYSTEM


class ConfigError(ValueError):
    """A job file or override that does not describe a valid job."""


INT_MAX = 2**31 - 1  # counts and sizes: the solver's loop counters are int32
SEED_MAX = 2**32 - 1  # seeds go into uint32 PRNG keys and uint64 checkpoint datasets


def _spec(default, *, choices=None, lo=None, hi=None, lo_open=False, pattern=None, item=int, doc="",
          hint="no spaces, quotes, $ or newlines"):
    if hi is None and type(default) is int:
        hi = INT_MAX
    return dataclasses.field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi,
                                                        "lo_open": lo_open, "pattern": pattern, "item": item,
                                                        "doc": doc, "hint": hint})


ENTRY = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"  # "module:function"
ENTRY_PATTERN = f"({ENTRY})?"
SHORTHAND_KEYS = ("hidden", "tau_init")  # [model] keys of the kind shorthand, passed to its entry
GENERATOR_KEYS = ("t1", "n_times", "noise", "seed")  # [data] keys of generated data (data.system) only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    entry: str = _spec("", pattern=ENTRY_PATTERN, hint='"module:function"',
                       doc='"module:function" returning a pipeline.Model; the module is looked up beside the job '
                           "file first, then on sys.path")
    kind: str = _spec("", choices=("", *SHIPPED), doc="shorthand for entry = pipeline.zoo.<kind>:make_model; "
                                                      "hnn when neither entry nor kind is given")
    hidden: tuple = _spec((32, 32), doc="kind shorthand: widths of the MLP's hidden layers")
    tau_init: float = _spec(1.0, lo=0.0, lo_open=True, doc="kind shorthand: initial delay (DDE kinds)")
    seed: int = _spec(0, lo=0, hi=SEED_MAX)
    source: str = _spec("", doc="the entry module's file; ndde train sets it to the run directory's copy")
    options: dict = dataclasses.field(default_factory=dict, metadata={"doc": "[model.options]: keyword arguments "
                                                                             "of the entry function"})


@dataclasses.dataclass(frozen=True)
class LossConfig:
    entry: str = _spec("", pattern=ENTRY_PATTERN, hint='"module:function"',
                       doc='"module:function", loss(pred_ys, obs_ys, mask) per trajectory; empty: masked MSE')
    source: str = _spec("", doc="the entry module's file; ndde train sets it to the run directory's copy")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    system: str = _spec("", choices=("", "pendulum", "mackey_glass", "delayed_gradient"),
                        doc="generated data only: the system the data comes from; empty: the kind's system, or "
                            "none (data.path must then name an existing file)")
    path: str = _spec("", doc="HDF5 file, relative to the job file; empty: data/<job name>.h5 (relative to the "
                              "working directory)")
    n_train: int = _spec(256, lo=1)
    n_test: int = _spec(16, lo=1)
    t1: float = _spec(3.0, lo=0.0, lo_open=True)
    n_times: int = _spec(31, lo=2)
    noise: float = _spec(0.0, lo=0.0)
    seed: int = _spec(1, lo=0, hi=SEED_MAX)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    method: str = _spec("tsit5", choices=("tsit5", "dopri5", "bosh3"))
    rtol: float = _spec(1e-6, lo=0.0, lo_open=True, hi=1.0)
    atol: float = _spec(1e-8, lo=0.0, lo_open=True, hi=1.0)
    max_steps: int = _spec(4096, lo=1)
    sensitivity: str = _spec("interpolating", choices=("backprop", "forward", "backsolve", "interpolating",
                                                       "quadrature"))
    checkpoints: int = _spec(16, lo=1, doc="for backprop and interpolating")
    history_size: int = _spec(0, lo=0, doc="DDE models: steps kept for delayed lookups (and by interpolating's "
                                           "checkpoints together); 0: the solver's default")
    dtype: str = _spec("float64", choices=("float32", "float64"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = _spec(100, lo=1)
    batch_size: int = _spec(64, lo=1)
    seed: int = _spec(0, lo=0, hi=SEED_MAX)
    on_nonfinite: str = _spec("stop", choices=("stop", "skip"))
    max_skips_in_a_row: int = _spec(10, lo=1, doc='on_nonfinite = "skip": stop after this many failed steps in a row')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = _spec("adam", choices=("adam", "adamw", "sgd"))
    learning_rate: float = _spec(1e-3, lo=0.0, lo_open=True)
    schedule: str = _spec("constant", choices=("constant", "cosine", "exponential"))
    decay_rate: float = _spec(0.1, lo=0.0, lo_open=True, hi=1.0, doc="exponential: factor over all steps")
    warmup_steps: int = _spec(0, lo=0)
    clip_norm: float = _spec(0.0, lo=0.0, doc="global-norm clipping; 0 disables")


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    kind: str = _spec("local", choices=("local", "dask", "dask-slurm", "mpi"))
    workers: int = _spec(1, lo=1, doc="shards (dask workers, mpi ranks); local computes them in turn")
    scheduler: str = _spec("", pattern=r"(((tcp|tls)://)?([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:]+\]):[0-9]{1,5})?",
                           doc="dask: tcp://host:port of an existing scheduler; empty: embedded cluster",
                           hint="host:port or tcp://host:port")
    pin_cpus: bool = _spec(True, doc="without GPUs: give each worker/rank on a node its own block of cores")
    worker_timeout: float = _spec(120.0, lo=0.0, lo_open=True, hi=86400.0,
                                  doc="dask: seconds a step waits with a shard that no worker can run (every "
                                      "worker dead or restarting) before the run checkpoints its last "
                                      "completed step and exits 75; also the wait for the first worker")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = _spec(50, lo=1)
    keep: int = _spec(3, lo=1)


_SLURM_WORD = r"[A-Za-z0-9_.,:+-]*"


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """Resources for `ndde submit`; values end up in #SBATCH lines, so each is checked
    against a pattern that admits no quotes, spaces, `$` or newlines."""

    job_name: str = _spec("", pattern=r"[A-Za-z0-9_.-]*", doc="default: the job's name")
    nodes: int = _spec(1, lo=1)
    ntasks_per_node: int = _spec(1, lo=1, doc="MPI ranks or Dask workers per node")
    gpus_per_node: int = _spec(0, lo=0)
    cpus_per_task: int = _spec(1, lo=1)
    mem: str = _spec("", pattern=r"([0-9]+[KMGT]?)?", doc="per node, e.g. 4G; empty: the cluster default")
    time: str = _spec("01:00:00", pattern=r"([0-9]+-)?[0-9]{1,2}(:[0-9]{2}){0,2}|[0-9]+")
    partition: str = _spec("", pattern=_SLURM_WORD)
    account: str = _spec("", pattern=_SLURM_WORD)
    qos: str = _spec("", pattern=_SLURM_WORD)
    extra: tuple = _spec((), item=str, pattern=r"--[a-z][a-z-]*(=[A-Za-z0-9_.,:/@%+=-]*)?",
                         doc='extra #SBATCH options, e.g. ["--constraint=a100"]')
    signal_grace: int = _spec(120, lo=1, hi=65535, doc="seconds between USR1 and the time limit (below slurm.time)")
    launcher: str = _spec("mpiexec", choices=("mpiexec", "srun"), doc="how the mpi backend starts ranks")


SECTIONS = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "solver": SolverConfig, "train": TrainConfig,
            "optimizer": OptimizerConfig, "backend": BackendConfig, "checkpoint": CheckpointConfig, "slurm": SlurmConfig}


@dataclasses.dataclass(frozen=True)
class JobConfig:
    name: str
    model: ModelConfig
    loss: LossConfig
    data: DataConfig
    solver: SolverConfig
    train: TrainConfig
    optimizer: OptimizerConfig
    backend: BackendConfig
    checkpoint: CheckpointConfig
    slurm: SlurmConfig
    base_dir: str = dataclasses.field(default="", compare=False)  # the job file's directory (entries are looked
    # up there first); neither written to TOML nor compared

    @property
    def data_path(self) -> pathlib.Path:
        return pathlib.Path(self.data.path or f"data/{self.name}.h5")

    def replace(self, section: str, **changes) -> "JobConfig":
        return dataclasses.replace(self, **{section: _section(section, {**dataclasses.asdict(getattr(
            self, section)), **changes})})

    def to_toml(self) -> str:
        lines = [f"name = {_toml_value(self.name)}"]
        for section in SECTIONS:
            lines.append(f"\n[{section}]")
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                if (section == "model" and key in SHORTHAND_KEYS and not self.model.kind or
                        section == "data" and key in GENERATOR_KEYS and not self.data.system):
                    continue
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _check_options(where: str, value: Any) -> dict:
    """[model.options]: a table of TOML values (dates excepted: to_toml writes none)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table ([{where}]), got {value!r}")

    def check(path, v):
        if isinstance(v, dict):
            for k, item in v.items():
                check(f"{path}.{k}", item)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                check(f"{path}[{i}]", item)
        elif not isinstance(v, (bool, int, float, str)):
            raise ConfigError(f"{path} = {v!r}: options take numbers, strings, booleans, arrays and tables")

    check(where, value)
    return dict(value)


def _check_value(section: str, field: dataclasses.Field, value: Any):
    where = f"{section}.{field.name}"
    meta, want = field.metadata, type(field.default)
    if want is tuple and meta["item"] is str:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and re.fullmatch(meta["pattern"], v) for v in value):
            raise ConfigError(f"{where} must be a list of strings matching {meta['pattern']} "
                              f"(no spaces, quotes, $ or newlines), got {value!r}")
        return tuple(value)
    if want is tuple:
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{where} must be a non-empty list of positive integers, got {value!r}")
        return tuple(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where} must be a finite float, got an integer of {len(str(abs(value)))} "
                              "digits") from None
    if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
        raise ConfigError(f"{where} must be of type {want.__name__}, got {value!r} ({type(value).__name__})")
    if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(f"{where} must match {meta['pattern']} ({meta['hint']}), got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, meta['choices']))}; got {value!r}")
    if want in (int, float):
        if want is float and not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        lo, hi = meta["lo"], meta["hi"]
        if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
            raise ConfigError(f"{where} must be {'>' if meta['lo_open'] else '>='} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{where} must be <= {hi}, got {value!r}")
    return value


def _section(section: str, table: Any):
    cls = SECTIONS[section]
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; [{section}] allows: {', '.join(fields)}")
    return cls(**{k: _check_options(f"{section}.{k}", v) if k == "options" else _check_value(section, fields[k], v)
                  for k, v in table.items()})


def _model_section(table: Any) -> ModelConfig:
    """[model] with ``kind`` resolved: entry = the kind's shipped entry (kind hnn when neither is
    given); the shorthand's keys belong to a kind only."""
    model = _section("model", table)
    if model.entry and model.kind and model.entry != SHIPPED[model.kind]:
        raise ConfigError(f"model.entry and model.kind name the model twice ({model.entry!r}, {model.kind!r}); give "
                          "one of them")
    if model.entry and not model.kind:
        given = [k for k in SHORTHAND_KEYS if k in table]
        if given:
            raise ConfigError(f"model.{given[0]} belongs to the kind shorthand; with model.entry put it in "
                              "[model.options]")
        return model
    kind = model.kind or "hnn"
    return dataclasses.replace(model, kind=kind, entry=SHIPPED[kind])


def from_dict(raw: dict, default_name: str = "job") -> JobConfig:
    raw = dict(raw)
    name = raw.pop("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[^\W][\w.-]{0,127}", name):
        raise ConfigError(f"name must be 1 to 128 letters, digits, '-', '_' or '.', not starting with '.' or '-' "
                          f"(it names the default run directory runs/<name>), got {name!r}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section or key {unknown[0]!r}; allowed: name, {', '.join(SECTIONS)}")
    job = JobConfig(name=name, **{s: _model_section(raw.get(s, {})) if s == "model" else _section(s, raw.get(s, {}))
                                  for s in SECTIONS})
    if job.model.kind and not job.data.system:
        job = dataclasses.replace(job, data=dataclasses.replace(job.data, system=SYSTEM[job.model.kind]))
    given = [k for k in GENERATOR_KEYS if k in (raw.get("data") or {})]
    if given and not job.data.system:
        raise ConfigError(f"data.{given[0]} is for generated data only (with data.system); a file of your own "
                          "brings its times in ts")
    check_consistent(job)
    return job


def check_consistent(job: JobConfig):
    kind = job.model.kind
    if kind and job.data.system not in ("", SYSTEM[kind]):
        raise ConfigError(f"data.system {job.data.system!r} does not fit model.kind {kind!r}; use {SYSTEM[kind]!r}")
    if kind in ("ndde", "delayed_gradient") and job.solver.sensitivity == "backsolve":
        raise ConfigError("solver.sensitivity 'backsolve' works for ODEs only; for the DDE model "
                          f"{kind!r} use 'interpolating', 'quadrature', 'backprop' or 'forward'")
    if job.train.batch_size % job.backend.workers:
        raise ConfigError(f"train.batch_size {job.train.batch_size} must be a multiple of backend.workers "
                          f"{job.backend.workers} (each worker takes an equal share)")
    if job.optimizer.warmup_steps >= job.train.steps:
        raise ConfigError(f"optimizer.warmup_steps {job.optimizer.warmup_steps} must be below train.steps "
                          f"{job.train.steps}: the learning rate would never reach optimizer.learning_rate")
    _check_slurm(job.slurm)
    if job.train.batch_size > job.data.n_train:
        raise ConfigError(f"train.batch_size {job.train.batch_size} exceeds data.n_train {job.data.n_train}")


# #SBATCH options the rendered script sets or relies on (requeue on USR1, its output file, its
# environment, its own resource lines); slurm.extra may not name them or an abbreviation of them.
RESERVED_SBATCH = ("requeue", "no-requeue", "signal", "export", "export-file", "chdir", "output", "error", "input",
                   "open-mode", "wrap", "array", "job-name", "nodes", "ntasks", "ntasks-per-node", "gpus-per-node",
                   "cpus-per-task", "mem", "time", "partition", "account", "qos", "parsable", "wait", "test-only",
                   "get-user-env", "uid", "gid", "kill-on-invalid-dep")


# sbatch options of their own that are also the start of a RESERVED_SBATCH name.
WHOLE_SBATCH = ("gpus",)


def slurm_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (minutes, minutes:seconds, hours:minutes:seconds,
    days-hours[:minutes[:seconds]]); None for 0, which Slurm reads as no limit."""
    days, _, clock = text.rpartition("-")
    parts = [int(v) for v in clock.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        total = ((int(days) * 24 + h) * 60 + m) * 60 + sec
    else:
        total = {1: lambda: parts[0] * 60, 2: lambda: parts[0] * 60 + parts[1],
                 3: lambda: (parts[0] * 60 + parts[1]) * 60 + parts[2]}[len(parts)]()
    return total or None


def _check_slurm(s: SlurmConfig):
    for option in s.extra:
        name = option[2:].split("=", 1)[0]
        clash = name if name in RESERVED_SBATCH else None if name in WHOLE_SBATCH else next(
            (r for r in RESERVED_SBATCH if r.startswith(name)), None)
        if clash is not None:
            own = clash.replace("-", "_")
            hint = (f"set slurm.{own} instead" if own in SlurmConfig.__dataclass_fields__ else
                    "the rendered script sets it or relies on it (requeue on USR1, its output file, its environment)")
            raise ConfigError(f"slurm.extra {option!r} conflicts with --{clash}: {hint}")
    limit = slurm_seconds(s.time)
    if limit is not None and s.signal_grace >= limit:
        raise ConfigError(f"slurm.signal_grace {s.signal_grace} s must be below the time limit slurm.time = "
                          f"{s.time!r} ({limit} s): USR1 would come before the job starts its work")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with value a TOML literal (bare words are taken as strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, value_text = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = value_text
    if isinstance(value, (datetime.date, datetime.time)):  # no key takes a date: 00:10:00 is slurm.time's text
        value = value_text.strip()
    return section, key, value


def load(path, overrides=()) -> JobConfig:
    """The job in the TOML file ``path``, with ``overrides`` (``section.key=value``) applied.

    Args:
        path: the job file. A relative ``data.path`` in it is taken relative to the file's
            directory, which is also where ``[model] entry`` modules are looked up first.
        overrides: ``--set`` texts; ``model.options.NAME=VALUE`` sets one option.

    Returns:
        The checked JobConfig (``base_dir``: the file's directory).

    Raises:
        ConfigError: the file is missing, not UTF-8 TOML, or not a valid job (naming the key).
    """
    path = pathlib.Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"job file {path} is not UTF-8 text (byte {err.start}: {err.reason}); TOML files are "
                          "UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path} nests arrays or tables too deeply to be a job file") from None
    base = path.resolve().parent
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
        raw = {**raw, "data": {**data, "path": str(base / data["path"])}}  # an absolute path stays as it is
    return dataclasses.replace(loads_dict(raw, path.stem, overrides), base_dir=str(base))


def run_job_file(run_dir) -> pathlib.Path:
    """RUN_DIR/job.toml, which ``ndde train`` and ``ndde submit`` write; its absence means run_dir
    is not a run directory."""
    path = pathlib.Path(run_dir) / "job.toml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return path


def new_run_dir(run_dir) -> pathlib.Path:
    """run_dir as a path, refused when it names a file (mkdir said only 'File exists')."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir")
    return run_dir


def loads_dict(raw: dict, default_name: str, overrides=()) -> JobConfig:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        table = raw.setdefault(section, {})
        *outer, last = key.split(".")  # model.options.NAME=VALUE sets one option
        for name in outer:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {section}.{name} is not a table")
        table[last] = value
    return from_dict(raw, default_name)


def from_toml_text(text: str) -> JobConfig:
    return from_dict(tomllib.loads(text))


def differences(a: JobConfig, b: JobConfig, sections) -> list[str]:
    """``section.key: old -> new`` for every key of ``sections`` that differs, but ``source``:
    where an entry's file lies (the original, or a run's copy) is not what it is (its sha256,
    which checkpoints record)."""
    out = []
    for section in sections:
        old, new = dataclasses.asdict(getattr(a, section)), dataclasses.asdict(getattr(b, section))
        out += [f"{section}.{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k] and k != "source"]
    return out
