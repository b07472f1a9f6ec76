"""Greedy samples of a few held-out prompts during a run: the `Samples` hook, and
`samples_hook`, which picks its prompts, tokenizer and checker from the config and the data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from apo_jax.config import RunConfig
from apo_jax.data import shards
from apo_jax.train.data import DataPaths
from apo_jax.train.hooks import Hook, Outputs, StepInfo

log = logging.getLogger("apo_jax")


class Samples(Hook):
    """Greedy generations of a few held-out prompts every `every` steps and at the end.

    Each round is appended to `<workdir>/samples.jsonl` (one line per prompt, with its step), put
    in TensorBoard's text tab, and, with a checker, scored as `samples/accuracy` in the metrics.
    A run that starts at step 0 samples its starting model first (step 0: the "before" of the
    summary); a resumed one reads its step-0 and latest rounds back from samples.jsonl. Runs on
    one process only (generation gathers results on the host).

    Returns ``samples`` (the round's rows) and ``samples_step``; at the start also
    ``samples_before`` (step 0's rows).
    """

    def __init__(
        self,
        every: int,
        rows: list[dict[str, Any]],
        tokenizer: Any,
        *,
        max_new_tokens: int,
        checker: Any,
        stop_tokens: list[int],
        mesh: Any,
        workdir: str,
        writer: Any,
        model: Callable[[Any], Any],
    ):
        self.every, self.rows, self.tokenizer = every, rows, tokenizer
        self.max_new_tokens, self.checker = max_new_tokens, checker
        self.stop_tokens, self.mesh = stop_tokens, mesh
        self.workdir, self.writer, self.model = workdir, writer, model

    def at_start(self, info: StepInfo) -> Outputs:
        if info.step == 0:
            out = self.act(info)
            return {**out, "samples_before": out["samples"]}
        return read_rounds(self.workdir, info.step)

    def act(self, info: StepInfo) -> Outputs:
        from apo_jax.eval import generation

        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        out = generation.sample(
            self.model(info.state.params),
            self.tokenizer,
            self.rows,
            sampling=generation.Sampling(max_new_tokens=self.max_new_tokens),
            batch_size=-(-min(len(self.rows), 8) // ways) * ways,
            stop_tokens=self.stop_tokens,
            checker=self.checker,
            mesh=self.mesh,
        )
        with open(os.path.join(self.workdir, "samples.jsonl"), "a", encoding="utf-8") as f:
            for row in out:
                f.write(json.dumps({"step": info.step, **row}, ensure_ascii=False) + "\n")
        text = "\n\n".join(f"**{r['prompt']}**\n\n{r['response']}" for r in out)
        self.writer.write_text(info.step, "samples", text)
        if self.checker is not None:
            scored = [r["correct"] for r in out if r.get("correct") is not None]
            if scored:
                self.writer.write(info.step, {"samples/accuracy": float(np.mean(scored))})
        return {"samples": out, "samples_step": info.step}


def read_rounds(workdir: str, step: int) -> Outputs:
    """A resumed run's samples read back from `<workdir>/samples.jsonl`: step 0's round as
    ``samples_before`` and the latest round up to `step` as ``samples`` (with ``samples_step``)."""
    rounds: dict[int, list[dict[str, Any]]] = {}
    path = os.path.join(workdir, "samples.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("step", -1) <= step:
                    rounds.setdefault(row.pop("step", -1), []).append(row)
    out: dict[str, Any] = {"samples_before": rounds.get(0, [])}
    if rounds:
        out["samples_step"] = max(rounds)
        out["samples"] = rounds[out["samples_step"]]
    return out


def samples_hook(
    rc: RunConfig,
    paths: DataPaths,
    mesh: jax.sharding.Mesh,
    *,
    workdir: str,
    writer: Any,
    model: Callable[[Any], Any],
) -> Samples | None:
    """The samples hook of the run, or None (off, several processes, no tokenizer, no prompts);
    `model(params)` is the policy with trained `params` as a module."""
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
    return Samples(
        rc.eval_every,
        rows,
        tokenizer,
        max_new_tokens=rc.samples.max_new_tokens,
        checker=scoring.load_checker(checker) if checker else None,
        stop_tokens=generation.stop_token_ids(tokenizer, rc.model.hf_path or None),
        mesh=mesh,
        workdir=workdir,
        writer=writer,
        model=model,
    )


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
            return [], (
                f"the held-out shards' source {path or '?'} is not on this machine; "
                "pass config.samples.prompts"
            )
    examples, _ = prompts.read(path, prompt_field=field, split=split)
    return [ex.record for ex in examples[:n]], f"no prompt rows in {path}"
