#!/usr/bin/env bash
# Every GPU comparison in one run (< 5 min on one H100/H200). Writes bench/results/gpu-<card>.md
# (and copies it to $OUT when the device tool runs it). Uses the machine's own jax/equinox/diffrax.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/ndde-jax-cache
python3 -c "import jax, equinox, diffrax; print('jax', jax.__version__, jax.devices())"
PYTHONPATH=. python3 bench/gpu.py
