"""HDF5 checkpoints with orbax's semantics (save, restore, latest_step, max_to_keep) and an
atomic finalize: write ``step_XXXXXXXX.h5.tmp``, fsync, rename, fsync the directory.

File layout (read exactly so by tests outside the project):

* root attrs ``format = "ndde-checkpoint"``, ``version = 1``, ``step``, ``config`` (the
  resolved job as TOML text), ``sha256``, and whatever ``attrs`` the caller adds;
* ``/params/<key path>`` and ``/opt_state/<key path>``: one dataset per pytree leaf, its key
  path joined with ``/`` (dict keys, attribute names, sequence indices);
* ``/rng``: the run's PRNG key data; ``/metrics/<name>``: per-step arrays.

``sha256`` is the hex digest over, in sorted order of dataset path, ``path``, dtype string,
shape and raw little-endian bytes of every dataset, then every root attr except
``sha256`` (sorted by name, ``name=repr(value)``). No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import stat
import time
import tomllib
import warnings

import h5py
import jax
import numpy as np

FORMAT, VERSION = "ndde-checkpoint", 1
_NAME = re.compile(r"^step_(\d{8})\.h5$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run."""


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def leaf_paths(tree) -> list[tuple[str, object]]:
    """(dataset name, leaf) of every leaf: its key path joined with "/" (dict keys, attribute
    names of equinox modules, sequence indices). Raises CheckpointError when two leaves would
    share a name (a dict key holding "/")."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = [("/".join(_key_name(k) for k in path) or "_", leaf) for path, leaf in flat]
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        clash = next(name for name in names if names.count(name) > 1)
        raise CheckpointError(f"two params leaves are both stored as {clash!r}: rename the dict key that holds '/'")
    return out


def _attr_text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return f"{value!r}"


def contents_digest(f: h5py.File) -> str:
    h = hashlib.sha256()
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in sorted(names):
        data = np.ascontiguousarray(f[name][...])
        h.update(f"{name}|{data.dtype.str}|{data.shape}|".encode())
        h.update(data.astype(data.dtype.newbyteorder("<")).tobytes())
    for key in sorted(k for k in f.attrs if k != "sha256"):
        h.update(f"{key}={_attr_text(f.attrs[key])}".encode())
    return h.hexdigest()


@dataclasses.dataclass
class Restored:
    step: int
    params: object
    opt_state: object
    rng: np.ndarray
    metrics: dict
    attrs: dict
    path: pathlib.Path


def _regular(path) -> tuple[os.stat_result | None, str | None]:
    """(lstat of ``path``, None) for a regular file, else (None, why it cannot be opened without
    risk: a FIFO blocks open(), a device or a symlink reads something else). Follows no symlink."""
    try:
        st = os.lstat(path)
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    if stat.S_ISREG(st.st_mode):
        return st, None
    mode = st.st_mode
    kind = ("a symlink" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file")
    return None, f"is {kind}, not a regular file"


def not_a_regular_file(path) -> str | None:
    """Why ``path`` is no regular file (see ``_regular``), or None."""
    return _regular(path)[1]


class CheckpointManager:
    """``save`` / ``restore`` / ``latest_step`` over ``directory/step_XXXXXXXX.h5``, keeping the
    newest ``keep`` files that verify. Files that do not verify are never deleted (a warning
    names them); the file just written is never deleted."""

    def __init__(self, directory, keep: int = 3):
        self.directory = pathlib.Path(directory)
        self.keep = keep
        self._verified = {}  # (step, st_ino, st_size, st_mtime_ns) -> verify's answer

    def path(self, step: int) -> pathlib.Path:
        return self.directory / f"step_{step:08d}.h5"

    def steps(self) -> list[int]:
        if not self.directory.exists():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, params, opt_state, rng, metrics: dict, config_text: str, attrs=None) -> pathlib.Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            for group, tree in (("params", params), ("opt_state", opt_state)):
                g = f.create_group(group)
                for name, leaf in leaf_paths(tree):
                    g[name] = np.asarray(leaf)
            f["rng"] = np.asarray(rng)
            m = f.create_group("metrics")
            for name, values in metrics.items():
                m[name] = np.asarray(values)
            f.attrs.update({"format": FORMAT, "version": VERSION, "step": step, "config": config_text,
                            **(attrs or {})})
            f.attrs["sha256"] = contents_digest(f)
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        pause = float(os.environ.get("NDDE_TEST_PAUSE_BEFORE_RENAME", "0"))  # fault-injection window
        if pause > 0:
            time.sleep(pause)
        os.replace(tmp, final)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        st = os.lstat(final)
        self._verified[(step, st.st_ino, st.st_size, st.st_mtime_ns)] = None  # written and fsynced just now
        self._rotate(step)
        return final

    def _rotate(self, written: int) -> None:
        """Delete the files that verify beyond the newest ``keep`` that do, the file just written
        counted among those kept whatever its step number."""
        kept, broken = 1, []
        for step in sorted((s for s in self.steps() if s != written), reverse=True):
            why = self.verify(step)
            if why is not None:
                broken.append(f"{self.path(step).name} ({why})")
            elif kept < self.keep:
                kept += 1
            else:
                self.path(step).unlink(missing_ok=True)
        if broken:
            warnings.warn(f"left in {self.directory}, not rotated, as they do not verify: {'; '.join(broken)}",
                          stacklevel=3)

    def verify(self, step: int) -> str | None:
        """None if the file at ``step`` is complete and intact, else why not."""
        st, why = _regular(self.path(step))
        if why is not None:
            return why
        key = (step, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._verified:
            self._verified[key] = self._check(step)
        return self._verified[key]

    def _check(self, step: int) -> str | None:
        try:
            with h5py.File(self.path(step), "r") as f:
                if f.attrs.get("format") != FORMAT or f.attrs.get("version") != VERSION:
                    return "not an ndde checkpoint of version 1"
                if f.attrs.get("sha256") != contents_digest(f):
                    return "sha256 does not match the contents"
                if int(f.attrs["step"]) != step:
                    return f"step attr {int(f.attrs['step'])} does not match the file name"
                return _layout_error(f)
        except (OSError, KeyError, ValueError, TypeError) as err:
            return f"unreadable ({err})"
        except RecursionError:
            return "unreadable (its attrs nest too deeply)"

    def latest_valid_step(self) -> int | None:
        """The newest step whose file verifies; broken newer files are skipped with a warning."""
        for step in reversed(self.steps()):
            why = self.verify(step)
            if why is None:
                return step
            warnings.warn(f"skipping checkpoint {self.path(step)}: {why}", stacklevel=2)
        return None

    def restore(self, step: int, params_like, opt_state_like) -> Restored:
        path = self.path(step)
        why = not_a_regular_file(path)
        if why is not None:
            raise CheckpointError(f"{path} {why}")
        with h5py.File(path, "r") as f:
            params = _read_tree(f["params"], params_like, path)
            opt_state = _read_tree(f["opt_state"], opt_state_like, path)
            metrics = {k: f["metrics"][k][...] for k in f["metrics"]}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            return Restored(int(f.attrs["step"]), params, opt_state, f["rng"][...], metrics, attrs, path)


def _layout_error(f: h5py.File) -> str | None:
    """What the layout in the module docstring lacks in ``f`` (a file signed again after an
    edit carries a valid sha256), or None."""
    for name, kind in (("params", h5py.Group), ("opt_state", h5py.Group), ("metrics", h5py.Group),
                       ("rng", h5py.Dataset)):
        if not isinstance(f.get(name), kind):
            return f"no {'group' if kind is h5py.Group else 'dataset'} /{name}"
    config = f.attrs.get("config")
    if isinstance(config, bytes):
        try:
            config = config.decode("utf-8")
        except UnicodeDecodeError:
            return "its config attr is not UTF-8 text"
    if not isinstance(config, str):
        return "no config attr (the job as TOML text)"
    try:
        tomllib.loads(config)
    except tomllib.TOMLDecodeError as err:
        return f"its config attr is not TOML ({err})"
    return None


def _read_tree(group, like, path):
    leaves = []
    for name, leaf in leaf_paths(like):
        if name not in group:
            raise CheckpointError(f"{path}: no dataset {group.name}/{name}; the model does not match")
        data = group[name][...]
        want = np.asarray(leaf)
        if data.shape != want.shape or data.dtype != want.dtype:
            raise CheckpointError(f"{path}: {group.name}/{name} has {data.dtype}{list(data.shape)}, the model "
                                  f"needs {want.dtype}{list(want.shape)}")
        leaves.append(data)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def read_attrs(path) -> dict:
    why = not_a_regular_file(path)
    if why is not None:
        raise CheckpointError(f"{path} {why}")
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
