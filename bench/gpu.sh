#!/usr/bin/env bash
# Benchmark 6: the GPU check, one prepared script (< 8 minutes on an H100/H200).
#   bench/gpu.sh          on a lent GPU machine (run from the repository root)
#   bench/gpu.sh --dry    tiny shapes on CPU, to check the script where no GPU is lent
# Uses the machine's own jax/flax/optax (no grain, array-record, ml-collections or datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--dry" ]]; then
  export JAX_PLATFORMS=cpu
fi
"$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 470 "$PY" bench/gpu_check.py "$@"
