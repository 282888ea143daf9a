#!/usr/bin/env bash
# Every GPU comparison in one run (< 5 min on one H100/H200). Writes bench/results/gpu-<card>.md
# (and copies it to $OUT when the device tool runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import jax, equinox, diffrax; print('jax', jax.__version__, jax.devices())"
PYTHONPATH=. python bench/gpu.py
