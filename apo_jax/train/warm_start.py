"""The demo's starting model: the demo's model preset briefly trained with the `sft` loss on the
chosen answers of the demo's training pairs, built once and cached beside the demo data.

A preference objective moves a model that already answers; from random weights the demo's greedy
samples are noise whatever it learns. The warm start is a short run of the trainer itself
(`apo_jax.train.train_and_evaluate`, loss `sft`), exported as a Hugging Face directory that the demo
then loads as `config.model.hf_path`. Its directory is keyed by :data:`VERSION`, the steps, the
model preset and the seed; a build runs in a temporary directory renamed into place, so a crash
leaves nothing half-written and two runs racing both end with the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from apo_jax.config import ConfigError, RunConfig
from apo_jax.errors import UserError

log = logging.getLogger("apo_jax")

VERSION = "warm-v1"  # bump when the recipe below changes: the cache then rebuilds
LEARNING_RATE = 3e-3
BATCH_SIZE = 32


class Interrupted(UserError):
    """The warm start's training stopped early (a signal); nothing is cached."""


def directory(demo_root: str, steps: int, preset: str, seed: int) -> str:
    """Where the warm start of these settings is cached (its `hf/` is the model)."""
    return os.path.join(demo_root, f"{VERSION}-{preset}-{steps}-s{seed}")


def apply(rc: RunConfig, demo_root: str, train: Callable[[Any, str], dict[str, Any]]) -> RunConfig:
    """`rc` with the demo's warm start as config.model.hf_path (built once by `train`, the
    trainer, from the demo's paired training shards); unchanged off the demo data (`demo_root`
    ''), with a model.hf_path of its own or with demo.warm_start_steps=0."""
    if not demo_root or rc.model.hf_path or not rc.demo.warm_start_steps:
        return rc
    root = directory(demo_root, rc.demo.warm_start_steps, rc.model.preset, rc.seed)
    if jax.process_count() > 1 and not os.path.exists(os.path.join(root, "hf", "config.json")):
        raise ConfigError(
            f"the demo's warm start ({root}) is built by one process: run the same command once "
            "on one process first, or pass --config.demo.warm_start_steps=0 (random weights)"
        )
    hf_dir = build(
        demo_root,
        os.path.join(demo_root, "train_shards"),
        steps=rc.demo.warm_start_steps,
        preset=rc.model.preset,
        seed=rc.seed,
        train=train,
    )
    return dataclasses.replace(rc, model=dataclasses.replace(rc.model, hf_path=hf_dir))


def build(
    demo_root: str,
    train_shards: str,
    *,
    steps: int,
    preset: str,
    seed: int,
    train: Callable[[Any, str], dict[str, Any]],
) -> str:
    """Builds (once) and returns the warm start's Hugging Face directory.

    Args:
      demo_root: the demo assets' directory (`demo.DemoAssets.root`); the model is cached in it.
      train_shards: the demo's training shards (their chosen answers are the sft targets).
      steps: sft steps of batch :data:`BATCH_SIZE` at :data:`LEARNING_RATE` (linear decay).
      preset: the model preset (`models/config.py`) trained.
      seed: model init and data order.
      train: runs a config in a workdir and returns its summary (the trainer's
        `train_and_evaluate`, passed in so that this module does not import the trainer).

    Returns:
      The `hf/` directory (safetensors, config.json, tokenizer).
    """
    root = directory(demo_root, steps, preset, seed)
    hf_dir = os.path.join(root, "hf")
    if os.path.exists(os.path.join(hf_dir, "config.json")):
        return hf_dir
    log.info(
        "building the demo's warm start: %d sft steps on the demo's chosen answers "
        "(once; cached in %s)",
        steps,
        root,
    )
    tmp = tempfile.mkdtemp(prefix=".build-", dir=demo_root)
    try:
        summary = train(_config(train_shards, steps, preset, seed), os.path.join(tmp, "run"))
        if not summary["finished"] or not summary["hf_export"]:
            raise Interrupted(
                f"the demo's warm start stopped at step {summary['steps']} of "
                f"{steps}: rerun the command to build it again"
            )
        os.makedirs(os.path.join(tmp, "out"))
        os.rename(summary["hf_export"], os.path.join(tmp, "out", "hf"))
        try:
            os.rename(os.path.join(tmp, "out"), root)  # atomic; a concurrent build may have won
        except OSError:
            if not os.path.exists(os.path.join(hf_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_dir


def _config(train_shards: str, steps: int, preset: str, seed: int) -> Any:
    from apo_jax.config import DEMO_SEQ_LEN, base_config, inner_run_overrides, with_overrides

    return with_overrides(
        base_config("sft", "demo"),
        {
            **inner_run_overrides(),
            "data.train": train_shards,
            "data.seq_len": DEMO_SEQ_LEN,
            "model.preset": preset,
            "seed": seed,
            "num_steps": steps,
            "batch_size": BATCH_SIZE,
            "optim.learning_rate": LEARNING_RATE,
            "log_every": 50,
            "demo.warm_start_steps": 0,
        },
    )
