"""The presets, as overrides of the tree's defaults, and the ConfigDict that configs/*.py return.

`base_config(loss, preset)` is the tree's defaults (`tree.RunConfig`) as an ml_collections
ConfigDict with `loss.name` set and the preset's overrides applied; the command line then
overrides any field (`--config.<section>.<field>=value`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from apo_jax import losses
from apo_jax.config import fields
from apo_jax.config.tree import RunConfig

PAPER_PRESETS = ("llama3_1b", "llama3_8b", "qwen2_5_7b", "qwen3_8b", "mistral_7b", "gemma3_4b")
RUN_PRESETS = ("demo", *PAPER_PRESETS)


def demo_overrides(loss: str) -> dict[str, Any]:
    """The demo preset: the tiny model from its warm start on the embedded demo data.

    It starts from a model already trained on the answers' format: small steps, and a beta that
    keeps both likelihoods near it, so its samples stay legible (docs/training.md, "Presets").
    """
    return {
        "model.preset": "tiny",
        "data.seq_len": -1,  # 128 on the demo's rows; your shards' max_length on your data
        "loss.beta": -1,  # 10.0 on the demo data; 0.1 (the paper's) on yours
        "optim.learning_rate": 2e-5,
        "optim.warmup_steps": 10,
        # 32 pairs a step; an unpaired loss takes as many completions (64 rows)
        "batch_size": 64 if losses.is_unpaired(loss) else 32,
        "num_steps": 0,
        "data.num_epochs": 1,
        "eval_every": 50,
        "log_every": 10,
        "checkpoint.every": 50,
        "plots": True,
        "samples.num_prompts": -1,  # 64 on the demo data, 3 on yours; off with no held-out split
        "samples.max_new_tokens": 48,
    }


def inner_run_overrides() -> dict[str, Any]:
    """The overrides of a run that another command starts and reads back (the demo's warm start,
    the lab's cells): quiet, no samples, plots or held-out evaluation before the end, one
    synchronous checkpoint kept at the end, and the Hugging Face export the caller loads."""
    return {
        "samples.num_prompts": 0,
        "plots": False,
        "progress_bar": False,
        "eval_every": 0,
        "checkpoint.every": 0,
        "checkpoint.keep": 1,
        "checkpoint.keep_best": 0,
        "checkpoint.async_save": False,
        "export_hf": True,
    }


def paper_overrides(preset: str) -> dict[str, Any]:
    """The paper's setting for Llama-3-8B-Instruct on CLAIR pairs, for any family's checkpoint of
    about that size (models/config.py presets); the model and data paths come from the command."""
    return {
        "model.preset": preset,
        "model.dtype": "bfloat16",
        "model.remat": "full",
        "reference.dtype": "bfloat16",
        "mesh.data": 1,
        "mesh.fsdp": -1,  # FSDP over every device
        "optim.name": "rmsprop",
        "optim.learning_rate": 2e-7,
        "optim.schedule": "constant",
        "optim.warmup_steps": 0,
        "batch_size": 16,
        "data.num_epochs": 18,
        "eval_every": 200,
        "checkpoint.every": 500,
    }


def base_config(loss: str, preset: str | None) -> ml_collections.ConfigDict:
    """The full config for `loss` (a losses.py name or mixture) and a preset name (None: demo)."""
    preset = preset or "demo"
    if preset not in RUN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(RUN_PRESETS)}")
    c = fields.config_dict(RunConfig)
    over = demo_overrides(loss) if preset == "demo" else paper_overrides(preset)
    return with_overrides(c, {"preset": preset, "loss.name": loss, **over})


def with_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields, as `--config.a.b=v` does on the command line (unknown fields raise)."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        node[leaf] = value
    return c
