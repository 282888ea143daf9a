import json
import pathlib

import jax
import pytest

jax.config.update("jax_enable_x64", True)

_HERE = pathlib.Path(__file__).parent
_SHARED = _HERE.parent.parent / "shared" / "refcases" / "cases.json"
_COPY = _HERE / "data" / "cases.json"


@pytest.fixture(scope="session")
def refcases():
    """The exact reference cases (shared/refcases when present, else the committed copy)."""
    path = _SHARED if _SHARED.exists() else _COPY
    return json.loads(path.read_text())
