"""The lab's steps: world, target, pair sources, aligned datasets, training cells.

Each function does one step's work inside its directory and returns its result (paths relative
to the lab's output directory); `apo_jax.lab.run` caches them with `apo_jax.lab.steps`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from typing import Any

from apo_jax.errors import UserError
from apo_jax.lab import world
from apo_jax.lab.steps import read_jsonl, write_jsonl

log = logging.getLogger("apo_jax")
SOURCES = ("clair", "stronger_preferred", "onpolicy_judge", "offpolicy_judge")
OBJECTIVES = ("dpo", "apo_zero", "apo_down", "sft")
MAX_NEW_TOKENS = 64  # the longest taught answer is about 45 tokens
OFFPOLICY_POOL = (
    ("strong-lm", "strong", 0.9),
    ("plain-lm", "plain", 0.6),
    ("weak-lm", "strong", 0.3),
)


class Interrupted(UserError):
    """A training step stopped by a signal before its last step (resumable)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the lab's results (each step's cache key is a part of it)."""

    seed: int = 0  # world seed (questions, noise, judges' coin flips)
    n_sft: int = 2000  # demonstrations the target is trained on
    sft_noise: float = 0.0  # fraction of demonstrations with a wrong value
    sft_steps: int = 600  # SFT steps of the target (few: under-trained on purpose)
    sft_lr: float = 3e-3
    pair_prompts: int = 768  # prompts the sources are built from
    pairs: int = 256  # pairs per source (the same prompts for every source)
    heldout: int = 300  # held-out prompts
    temperature: float = 0.7  # the target's sampling temperature for its own answers
    steps: int = 40  # preference-training steps of every cell
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 0.1
    sources: tuple[str, ...] = SOURCES
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: int = 3
    model: str = "tiny"  # models/config.py preset of the target
    rounds: int = 1  # CLAIR rounds: each later one trains the previous round's model again


def _prompt_rows(questions: list[str], prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "prompt": q} for i, q in enumerate(questions)]


def build_world(d: str, s: Settings) -> dict[str, Any]:
    """Questions (SFT, pair prompts, held-out: disjoint), demonstrations, tokenizer, SFT shards."""
    from apo_jax.data import demo, prepare

    heldout = world.questions(s.heldout, s.seed + 1)
    pair_q = world.questions(s.pair_prompts, s.seed + 2, exclude=set(heldout))
    sft_q = world.questions(s.n_sft, s.seed + 3, exclude=set(heldout) | set(pair_q))
    rng = random.Random(s.seed)
    sft = []
    for q in sft_q:
        chosen, rejected = world.demonstration(q, rng, s.sft_noise)
        sft.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    write_jsonl(os.path.join(d, "sft.jsonl"), sft)
    write_jsonl(os.path.join(d, "pair_prompts.jsonl"), _prompt_rows(pair_q, "train"))
    write_jsonl(os.path.join(d, "heldout.jsonl"), _prompt_rows(heldout, "heldout"))
    texts = [r["chosen"] for r in sft] + [r["rejected"] for r in sft] + sft_q + pair_q
    for q in pair_q[:300]:  # the other styles' wording, so every source tokenizes compactly
        sol = world.solve(q)
        texts += [world.render(sol, style) for style in world.STYLES]
    demo.train_tokenizer(texts, os.path.join(d, "tokenizer"))
    manifest = prepare.prepare(
        os.path.join(d, "sft.jsonl"),
        os.path.join(d, "tokenizer"),
        os.path.join(d, "sft_shards"),
        prepare.Settings(max_length=128),
    )
    return {"sft_pairs": manifest["counts"]["written"], "heldout": len(heldout)}


def evaluate(hf_dir: str, heldout_path: str, out_path: str) -> dict[str, Any]:
    """Greedy answers of the checkpoint to the held-out prompts, checked; writes the JSONL."""
    from transformers import AutoTokenizer

    from apo_jax.eval import checkers, generation
    from apo_jax.models import hf

    model, _ = hf.load_hf(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = read_jsonl(heldout_path)
    out = generation.sample(
        model,
        tokenizer,
        rows,
        sampling=generation.Sampling(max_new_tokens=MAX_NEW_TOKENS),
        batch_size=100,
        stop_tokens=generation.stop_token_ids(tokenizer, hf_dir),
        checker=checkers.demo,
    )
    write_jsonl(out_path, [{k: r[k] for k in ("id", "prompt", "response", "correct")} for r in out])
    return {"accuracy": sum(r["correct"] for r in out) / len(out), "count": len(out)}


def _train(config: Any, workdir: str) -> dict[str, Any]:
    from apo_jax import train

    summary = train.train_and_evaluate(config, workdir)
    if summary["interrupted"] or not summary["hf_export"]:
        raise Interrupted(
            f"training in {workdir} stopped at step {summary['steps']}; its "
            "checkpoint is saved: rerun the same command to resume"
        )
    return summary


def _config(loss: str, overrides: dict[str, Any]) -> Any:
    from apo_jax.config import base_config, inner_run_overrides, with_overrides

    common = {
        **inner_run_overrides(),
        "data.seq_len": 128,
        "log_every": 5,
        "optim.warmup_steps": 5,
    }
    return with_overrides(base_config(loss, "demo"), {**common, **overrides})


def train_target(d: str, s: Settings, world_dir: str) -> dict[str, Any]:
    """SFT of a fresh model on the demonstrations, briefly; then its held-out generations."""
    config = _config(
        "sft",
        {
            "model.preset": s.model,
            "data.train": os.path.join(world_dir, "sft_shards"),
            "num_steps": s.sft_steps,
            "optim.learning_rate": s.sft_lr,
            "batch_size": s.batch_size,
            "seed": s.seed,
        },
    )
    _train(config, os.path.join(d, "run"))
    scores = evaluate(
        os.path.join(d, "run", "hf"),
        os.path.join(world_dir, "heldout.jsonl"),
        os.path.join(d, "generations.jsonl"),
    )
    return {"hf": "run/hf", "generations": "generations.jsonl", **scores}


def train_cell(
    d: str, s: Settings, shard_dir: str, target_hf: str, objective: str, seed: int, heldout: str
) -> dict[str, Any]:
    """Preference (or SFT) training of the target on one source; then its held-out generations."""
    config = _config(
        objective,
        {
            "model.hf_path": target_hf,
            "data.train": shard_dir,
            "num_steps": s.steps,
            "optim.learning_rate": s.lr,
            "loss.beta": s.beta,
            "batch_size": s.batch_size,
            "seed": seed,
        },
    )
    summary = _train(config, os.path.join(d, "run"))
    scores = evaluate(os.path.join(d, "run", "hf"), heldout, os.path.join(d, "generations.jsonl"))
    keep = ("train/loss", "train/logps/chosen", "train/logps/rejected", "train/rewards/margins")
    return {
        "generations": "generations.jsonl",
        "run": "run",
        **scores,
        **{k.replace("train/", ""): summary[k] for k in keep if k in summary},
    }
