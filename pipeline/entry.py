"""Entries ``"module:function"`` of a job file: the module's file is found (beside the job
file first, then on sys.path), imported from that file alone (no change to sys.path), and
the function called with the job's options as keyword arguments.

A run imports its own copy of the file (RUN_DIR/model/), so every process of the run (Dask
workers, MPI ranks, requeued Slurm jobs) runs the same code; the file's sha256 is recorded in
every checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import pathlib
import re
import shutil
import sys

from .config import ENTRY, ConfigError


def split(entry: str) -> tuple[str, str]:
    """("module", "function") of ``entry``; ConfigError unless it is ``module:function``."""
    if not re.fullmatch(ENTRY, entry):
        raise ConfigError(f"entry {entry!r} must be \"module:function\" (e.g. \"hutchinson:make_model\")")
    module, function = entry.split(":")
    return module, function


def locate(entry: str, job_dir=None) -> pathlib.Path:
    """The file of ``entry``'s module: ``job_dir/<module>.py`` when it exists, else the module's
    file as Python finds it on sys.path. That one file is what a run copies and hashes: sibling
    modules it imports are neither, so an entry must be one self-contained file (a package's
    ``__init__.py`` is refused).

    Args:
        entry: ``"module:function"``; a dotted module is a path below job_dir.
        job_dir: the job file's directory, or None.

    Returns:
        The absolute path of the module's source file.

    Raises:
        ConfigError: neither place has the module (both places are named), or it is a package.

    Example:
        >>> locate("pipeline.zoo.hnn:make_model").name
        'hnn.py'
    """
    module, _ = split(entry)
    looked = []
    if job_dir is not None:
        beside = pathlib.Path(job_dir).resolve() / (module.replace(".", "/") + ".py")
        if beside.is_file():
            return beside
        looked.append(str(beside))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        spec, why = None, f" ({type(err).__name__}: {err})"
    else:
        why = ""
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        if spec.submodule_search_locations is not None or pathlib.Path(spec.origin).name == "__init__.py":
            raise ConfigError(f"entry {entry!r}: {module!r} is a package ({spec.origin}); an entry must be one "
                              "self-contained module file (a run copies and hashes only that file), e.g. "
                              f"\"{module}.<module>:<function>\"")
        return pathlib.Path(spec.origin).resolve()
    looked.append(f"sys.path{why}")
    raise ConfigError(f"entry {entry!r}: module {module!r} not found; looked in {' and '.join(looked)}")


def digest(path) -> str:
    """sha256 of a source file's bytes."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def load(entry: str, source, sha256: str | None = None) -> object:
    """The function of ``entry``, importing its module from the file ``source``. The module
    object is registered in sys.modules under a name of its own (module name and sha256), so
    two runs' versions of one module never mix. ``sha256``: the digest the file must have (a
    worker is handed the root's, so it never runs other code than the root records).

    Raises:
        ConfigError: the file does not import (its error in one line), lacks the function, or
            its sha256 is not ``sha256``.
    """
    module_name, function = split(entry)
    source = pathlib.Path(source)
    if not source.is_file():
        raise ConfigError(f"entry {entry!r}: its module's file {source} does not exist")
    found = digest(source)
    if sha256 and found != sha256:
        raise ConfigError(f"entry {entry!r}: {source} has sha256 {found[:12]}... but this run's root process "
                          f"loaded {sha256[:12]}...: the file changed while the run started; restart it")
    key = "_ndde_entry_" + re.sub(r"\W", "_", module_name) + "_" + found[:16]
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 (the user's code: any error, named in one line)
            del sys.modules[key]
            raise ConfigError(f"entry {entry!r}: importing {source} failed: {type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"entry {entry!r}: {source} has no function {function!r}")
    return fn


def call(fn, entry: str, options: dict, section: str):
    """``fn(**options)``, refusing options that ``fn`` does not take (by its signature).

    Raises:
        ConfigError: naming the first option ``fn`` does not take, or a required one missing.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = sig.parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            unknown = sorted(set(options) - set(takes))
            if unknown:
                raise ConfigError(f"{section}.options.{unknown[0]}: {entry} does not take it; it takes: "
                                  f"{', '.join(takes) or 'no options'}")
        try:
            sig.bind(**options)
        except TypeError as err:
            raise ConfigError(f"[{section}.options] do not fit {entry}{sig}: {err}") from None
    try:
        return fn(**options)
    except Exception as err:  # noqa: BLE001 (the user's code: any error, named in one line)
        raise ConfigError(f"{section}.entry {entry!r} failed with the job's options: {type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0]}") from None


def in_run(job, run_dir):
    """The job (as a run directory's job.toml gives it) with each entry's ``source`` naming the
    run's own copy RUN_DIR/model/<name> where that exists, wherever the job.toml says the file
    was (the run directory may have moved, the original may have been edited since)."""
    target = pathlib.Path(run_dir).resolve() / "model"
    for section in ("model", "loss"):
        cfg = getattr(job, section)
        if cfg.entry and cfg.source and (target / pathlib.Path(cfg.source).name).is_file():
            job = job.replace(section, source=str(target / pathlib.Path(cfg.source).name))
    return job


def sources(job) -> dict:
    """{"model": file, "loss": file} of the job's entries (loss only when it has one): the
    ``source`` a run recorded, else the file ``locate`` finds."""
    out = {}
    for section in ("model", "loss"):
        cfg = getattr(job, section)
        if cfg.entry:
            out[section] = pathlib.Path(cfg.source) if cfg.source else locate(cfg.entry, job.base_dir or None)
    return out


def digests(job) -> dict:
    """Checkpoint attrs ``<section>_file`` and ``<section>_sha256`` of the job's entry files."""
    out = {}
    for section, path in sources(job).items():
        out[f"{section}_file"], out[f"{section}_sha256"] = str(path), digest(path)
    return out


def expected(job) -> tuple:
    """((section, sha256), ...) of the job's entry files: what the root hands its workers, who
    refuse a file of another digest and key their compiled steps on it."""
    return tuple(sorted((section, digest(path)) for section, path in sources(job).items()))


def copy_into_run(job, run_dir, write=True):
    """The job with its entry files copied to RUN_DIR/model/ and ``source`` naming the copies.
    A file already there is never overwritten (whatever ``source`` names now), so a resumed or
    requeued run keeps its own copy. ``write`` False names the copies only (the MPI ranks whose
    root copies). Only the entry's one file is copied (and hashed): sibling modules it imports
    are not, so an entry must be one self-contained file.

    Raises:
        ConfigError: an entry's module is not found; FileExistsError: two entries' files share a name.
    """
    target = pathlib.Path(run_dir).resolve() / "model"
    copied = {}  # copy -> original
    for section, path in sources(job).items():
        dest = target / path.name
        if write and path.resolve() != dest:
            if copied.get(dest, path.resolve()) != path.resolve():
                raise FileExistsError(f"the model and loss entries' files {copied[dest]} and {path} share a name; "
                                      "rename one of them")
            if not dest.exists():  # never overwrite: a run's copy is the code its checkpoints record
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
            copied[dest] = path.resolve()
        job = job.replace(section, source=str(dest))
    return job
