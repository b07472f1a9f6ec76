r"""APO-zero on unpaired preferences (TRL's KTO layout: prompt, completion, bool label).

APO-zero split per example: desirable completions are pushed up, undesirable ones down; no KL
estimate is needed, so only the completion rows run.

Run the embedded demo (tiny model; the generated pairs split into desirable and undesirable
records) on a CPU:
  python -m apo_jax.train --config=configs/apo_zero_unpaired.py
On your own data (rows {"prompt", "completion", "label"}, prepared with
python -m apo_jax.data.prepare, which recognizes the layout):
  python -m apo_jax.train --config=configs/apo_zero_unpaired.py:llama3_8b \
    --config.model.hf_path=/ckpt/Meta-Llama-3-8B-Instruct --config.data.train=/data/kto/train \
    --workdir=/runs/apo_zero_unpaired_8b

Every other field keeps the config tree's default (apo_jax/config; the table in docs/training.md),
with the preset's overrides (apo_jax/config/presets.py); any field is one flag away:
--config.<section>.<field>=value.
"""

from apo_jax.config import base_config


def get_config(arg=None):
    """Presets: demo (default), llama3_1b, llama3_8b, qwen2_5_7b, qwen3_8b, mistral_7b, gemma3_4b."""
    return base_config(
        loss="apo_zero_unpaired",  # data.layout=auto reads unpaired rows for this loss
        preset=arg,
    )
