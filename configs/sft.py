r"""SFT on preference pairs: the chosen answers' negative log-likelihood, no reference.

Supervised fine-tuning on the chosen side only (token mean over the batch, as TRL), the usual
first stage before a preference objective.

Run the embedded demo (tiny model, generated pairs) on a CPU:
  python -m apo_jax.train --config=configs/sft.py
The paper's setting on Llama-3-8B-Instruct (needs a checkpoint and prepared CLAIR shards):
  python -m apo_jax.train --config=configs/sft.py:llama3_8b \
    --config.model.hf_path=/ckpt/Meta-Llama-3-8B-Instruct --config.data.train=/data/clair/train \
    --config.data.eval=/data/clair/eval --workdir=/runs/sft_8b

Every other field keeps the config tree's default (apo_jax/config; the table in docs/training.md),
with the preset's overrides (apo_jax/config/presets.py); any field is one flag away:
--config.<section>.<field>=value.
"""

from apo_jax.config import base_config


def get_config(arg=None):
    """Presets: demo (default), llama3_1b, llama3_8b, qwen2_5_7b, qwen3_8b, mistral_7b, gemma3_4b."""
    return base_config(
        loss="sft",  # -sum log pi(y_w | x) / sum |y_w|
        preset=arg,
    )
