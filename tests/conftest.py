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


def pytest_collection_modifyitems(items):
    """Slow tests first (stable otherwise): pytest-xdist hands out tests in collection order, so the
    long ones start early and the last minutes are not one worker finishing a 2-minute test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
