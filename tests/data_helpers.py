"""Helpers shared by the data tests (imported, not a test module); the fixtures are in conftest.py."""

from __future__ import annotations

import json


def write_jsonl(path: str, rows: list) -> str:
    """Writes rows as JSON lines (bytes rows are written verbatim); returns the path."""
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return str(path)


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    """A CLAIR-layout row: string prompt, chosen/rejected as [user, assistant] message lists."""
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def small_run_config(shard_dir: str, **overrides):
    """A 4-step apo_down run on ``shard_dir`` (concat rows, no samples, plots, export or async
    saves), with ``overrides`` as `--config.a.b=v` would set them."""
    from apo_jax.config import base_config, with_overrides

    o = {
        "data.train": shard_dir,
        "data.layout": "concat",
        "data.seq_len": 0,
        "samples.num_prompts": 0,
        "plots": False,
        "export_hf": False,
        "progress_bar": False,
        "batch_size": 8,
        "num_steps": 4,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint.every": 0,
        "checkpoint.async_save": False,
        "optim.warmup_steps": 0,
    }
    o.update(overrides)
    return with_overrides(base_config("apo_down", None), o)
