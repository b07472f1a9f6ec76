r"""KTO on unpaired preferences (TRL's KTO layout: prompt, completion, bool label).

Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 7): each example is desirable or not,
scored against a batch estimate of the KL term.

Run the embedded demo (tiny model; the generated pairs split into desirable and undesirable
records) on a CPU:
  python -m apo_jax.train --config=configs/kto.py
On your own data (rows {"prompt", "completion", "label"}, prepared with
python -m apo_jax.data.prepare, which recognizes the layout):
  python -m apo_jax.train --config=configs/kto.py:llama3_8b \
    --config.model.hf_path=/ckpt/Meta-Llama-3-8B-Instruct --config.data.train=/data/kto/train \
    --workdir=/runs/kto_8b

Every other field keeps the config tree's default (apo_jax/config; the table in docs/training.md),
with the preset's overrides (apo_jax/config/presets.py); any field is one flag away:
--config.<section>.<field>=value.
"""

from apo_jax.config import base_config


def get_config(arg=None):
    """Presets: demo (default), llama3_1b, llama3_8b, qwen2_5_7b, qwen3_8b, mistral_7b, gemma3_4b."""
    return base_config(
        loss="kto",  # data.layout=auto reads unpaired rows for this loss, with KL rows
        preset=arg,
    )
