#!/usr/bin/env bash
# The exact-gradient tests (float64, and the float32 ones) run on the GPU: every sensitivity on
# the refcases and the neural-DDE agreement test. Not part of CI (CI has no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.:tests JAX_COMPILATION_CACHE_DIR=/tmp/ndde-jax-cache
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m pytest tests/test_sensitivities.py tests/test_delays.py -k "exact or agrees or float32" -n 8 -q -p no:cacheprovider "$@"
