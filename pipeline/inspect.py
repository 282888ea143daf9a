"""``ndde inspect FILE.h5``: what an ndde checkpoint or data file holds, without loading it."""

from __future__ import annotations

import pathlib

import h5py

from .checkpoint import FORMAT, contents_digest


def describe(path) -> str:
    if not pathlib.Path(path).is_file():
        what = "is a directory, not a file" if pathlib.Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(f"{path} {what}: give a checkpoint (RUN_DIR/checkpoints/step_*.h5) or data file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise FileNotFoundError(f"{path} is not a readable HDF5 file: {err}") from None
    lines = [str(path)]
    with f:
        for key in sorted(f.attrs):
            value = f.attrs[key]
            text = value.decode() if isinstance(value, bytes) else str(value)
            if key == "config":
                text = f"({len(text.splitlines())} lines of TOML)"
            lines.append(f"  @{key} = {text}")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  {name}: {obj.dtype} {list(obj.shape)}")

        f.visititems(visit)
        if f.attrs.get("format") == FORMAT:
            ok = f.attrs.get("sha256") == contents_digest(f)
            lines.append(f"  sha256 {'verifies' if ok else 'DOES NOT MATCH the contents'}")
    return "\n".join(lines)
