#!/usr/bin/env bash
# Benchmark 6: the GPU check, one prepared script (< 8 minutes on an H100/H200, by its budgets).
#   bench/gpu.sh          on a lent GPU machine (run from the repository root)
#   bench/gpu.sh --dry    tiny shapes on CPU, to check the script where no GPU is lent
# Uses the machine's own jax/flax/optax (no grain, array-record, ml-collections or datasets). If a
# tiny train step fails with the machine's flax/optax and wheels were carried in .whl/ (see
# docs/performance.md), those are installed to /tmp/site and used instead.
# Meanwhile the Llama-3-8B memory estimate (bench/llama8b_memory.py, 8 simulated CPU devices)
# runs on the machine's CPU cores. Last, in a process of its own, a llama3_8b LoRA step on the one
# device (gpu_check.py --llama8b, at most 150 s, skipped when the 8 minutes would be exceeded). Results: $OUT (or bench/out)/gpu_results.jsonl, llama8b.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--dry" ]]; then
  export JAX_PLATFORMS=cpu
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true

smoke() {
  "$PY" - <<'PYEOF'
import jax, jax.numpy as jnp, flax, optax, functools
from flax import nnx
from apo_jax.train import train_step as ts
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.optim import OptimConfig, make_optimizer
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())
g, p = ts.split_model(Llama(get_preset("tiny"), rngs=nnx.Rngs(0)))
tx, sched = make_optimizer(OptimConfig(), 10)
st = ts.init_state(p, tx, 0)
b = {"input_ids": jnp.ones((4, 8), jnp.int32), "completion_mask": jnp.ones((4, 8), jnp.int32),
     "positions": jnp.tile(jnp.arange(8), (4, 1)), "segment_ids": jnp.ones((4, 8), jnp.int32),
     "index": jnp.arange(2), "ref_chosen_logps": jnp.zeros(2), "ref_rejected_logps": jnp.zeros(2)}
f = jax.jit(functools.partial(ts.train_step, graphdef=g, tx=tx, cfg=ts.StepConfig(), schedule=sched))
st, m = f(st, b, None)
assert bool(jnp.isfinite(m["loss"])), m
print("smoke step ok, loss", float(m["loss"]))
PYEOF
}
if ! smoke; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "the machine's packages failed the smoke step: installing the carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
    smoke || { echo "smoke step fails with the carried wheels too"; exit 1; }
  else
    echo "smoke step failed and no wheels were carried"; exit 1
  fi
fi

MEM_ARGS=(--seqs 4096 --pairs 1,2 --remat full)
[[ "${1:-}" == "--dry" ]] && MEM_ARGS=(--preset tiny --seqs 256 --pairs 1 --remat full)
JAX_PLATFORMS=cpu timeout 400 "$PY" bench/llama8b_memory.py "${MEM_ARGS[@]}" \
  >"$OUT_DIR/llama8b.txt" 2>&1 &
MEM_PID=$!

timeout 400 "$PY" bench/gpu_check.py --out "$OUT_DIR" "$@"
RC=$?

# The one-device llama3_8b LoRA step: its own process (a clean peak-memory figure, the 1B state
# freed), 150 s of its own budget, 20 s more for the start and imports, all within 470 s.
LEFT=$((470 - SECONDS))
if ((LEFT >= 90)); then
  B8=$((LEFT - 20 < 150 ? LEFT - 20 : 150))
  timeout "$((B8 + 20))" "$PY" bench/gpu_check.py --out "$OUT_DIR" --llama8b \
    --llama8b-budget-s "$B8" "$@" || echo "llama8b LoRA step exited $?"
else
  echo "llama8b LoRA step skipped: ${SECONDS} s spent, ${LEFT} s left of 470 (needs 90)"
fi
wait "$MEM_PID" || echo "llama8b_memory exited $?"
echo "--- llama8b_memory (CPU estimate) ---"
tail -n 8 "$OUT_DIR/llama8b.txt"
exit $RC
