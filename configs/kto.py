"""kto on unpaired preferences (TRL's KTO layout: prompt, completion, bool label).

Run the embedded demo (tiny model; the generated pairs split into desirable and undesirable
records) on a CPU:
  python -m apo_jax.train --config=configs/kto.py
On your own data (rows {"prompt", "completion", "label"}, prepared with
python -m apo_jax.data.prepare, which recognizes the layout):
  python -m apo_jax.train --config=configs/kto.py:llama3_8b \
    --config.model.hf_path=/ckpt/Meta-Llama-3-8B-Instruct --config.data.train=/data/kto/train \
    --workdir=/runs/kto_8b
"""

from apo_jax.config_base import base_config


def get_config(arg=None):
    """Presets: demo (default), llama3_1b, llama3_8b."""
    c = base_config("kto", arg)
    if c.preset == "demo":  # 64 completions a step, as the pair demo's 32 pairs
        c.batch_size = 64
    c.data.layout = "unpaired"  # completion rows, then the KL rows of mismatched pairs
    c.loss.desirable_weight = 1.0  # KTO paper, eq. 8: keep weight x count about balanced
    c.loss.undesirable_weight = 1.0
    return c
