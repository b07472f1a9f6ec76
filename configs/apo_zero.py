"""apo_zero on preference pairs.

Run the embedded demo (tiny model, generated pairs) on a CPU:
  python -m apo_jax.train --config=configs/apo_zero.py
The paper's setting on Llama-3-8B-Instruct (needs a checkpoint and prepared CLAIR shards):
  python -m apo_jax.train --config=configs/apo_zero.py:llama3_8b \
    --config.model.hf_path=/ckpt/Meta-Llama-3-8B-Instruct --config.data.train=/data/clair/train \
    --config.data.eval=/data/clair/eval --workdir=/runs/apo_zero_8b
"""

from apo_jax.config import base_config


def get_config(arg=None):
    """Presets: demo (default), llama3_1b, llama3_8b, qwen2_5_7b, qwen3_8b, mistral_7b, gemma3_4b."""
    return base_config("apo_zero", arg)
