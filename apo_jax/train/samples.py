"""The samples hook's setup: which held-out prompts a run answers greedily, and with which
tokenizer and checker (the hook itself is `apo_jax.train.hooks.Samples`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from apo_jax.config import RunConfig
from apo_jax.data import shards
from apo_jax.train.data import DataPaths

log = logging.getLogger("apo_jax")


def samples_hook(rc: RunConfig, paths: DataPaths, mesh: jax.sharding.Mesh) -> Any:
    """The samples hook of the run, or None (off, several processes, no tokenizer, no prompts)."""
    from apo_jax.train import hooks

    if not rc.samples.num_prompts:
        return None
    rows, why = sample_rows(paths, rc.samples.num_prompts)
    if jax.process_count() > 1 or not paths.tokenizer or not rows:
        why = "several processes" if jax.process_count() > 1 else why
        log.info("config.samples is off for this run: %s", why or "no tokenizer directory")
        return None
    import transformers

    from apo_jax.eval import generation, scoring

    tokenizer = transformers.AutoTokenizer.from_pretrained(paths.tokenizer)
    checker = paths.sample_checker
    return hooks.Samples(
        rc.eval_every, rows, tokenizer, max_new_tokens=rc.samples.max_new_tokens,
        checker=scoring.load_checker(checker) if checker else None,
        stop_tokens=generation.stop_token_ids(tokenizer, rc.model.hf_path or None), mesh=mesh,
    )  # fmt: skip


def sample_rows(paths: DataPaths, n: int) -> tuple[list[dict[str, Any]], str]:
    """The first `n` prompt rows for samples, and why there are none ('' when there are).

    The rows come from `paths.sample_prompts` (samples.prompts, or the demo's held-out pairs),
    else from the file the held-out shards were prepared from (their manifest's input).
    """
    from apo_jax.eval import prompts

    path, field, split = paths.sample_prompts, "prompt", "train"
    if not path:
        if not paths.eval:
            return [], "no held-out split (config.data.eval) and no config.samples.prompts"
        manifest = shards.read_manifest(paths.eval)
        inputs = manifest.get("inputs") or [""]
        settings = manifest.get("settings", {})
        path, split = inputs[0], settings.get("split", split)
        field = settings.get("fields", {}).get("prompt", field)
        if not os.path.exists(path):
            return [], (f"the held-out shards' source {path or '?'} is not on this machine; "
                        "pass config.samples.prompts")  # fmt: skip
    examples, _ = prompts.read(path, prompt_field=field, split=split)
    return [ex.record for ex in examples[:n]], f"no prompt rows in {path}"
