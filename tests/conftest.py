import json
import os
import pathlib
import shutil
import tempfile

# One persistent compilation cache for the whole test session, made before jax is imported and
# inherited by the xdist workers and every process the tests start (training runs, Dask
# workers, MPI ranks, Slurm jobs). The pipeline's training step holds no host callback, so it
# compiles once per session instead of once per process (see pipeline/shard.py).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ndde-test-jax-cache-")

# The tests compile far more than they run (XLA's CPU backend took two thirds of their time):
# they ask it for its previous fusion emitter, ~30% quicker to compile than the MLIR one,
# before jax is imported, inherited by every process they start. Programs run ~1.5x slower and
# round differently from the default build (jnp.linspace(0.5, 4, 8)[5] is 3 - 1 ulp there),
# which no tolerance here may depend on: that difference moved a save time an ulp off 5τ and
# exposed a wrong Hessian (see saves_off_breakpoints). Adding LLVM -O0 compiled faster still
# but broke test_dde_adjoint_hessian_vector_product_by_linearize (2e-7 where either flag alone
# and the defaults agree bit for bit). NDDE_TEST_XLA_DEFAULTS=1 runs the tests with XLA's defaults.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("NDDE_TEST_XLA_DEFAULTS") != "1" and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
