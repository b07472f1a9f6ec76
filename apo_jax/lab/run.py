"""The whole lab, step by step, each step cached (`apo_jax.lab.steps`), with one progress bar.

world -> target -> pairs (all sources, aligned) -> one training cell per (source, objective,
seed) -> results.json and report.md. Rerunning with the same settings skips every finished step;
changing a setting redoes the steps that depend on it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from apo_jax.lab import pipeline, report, sources
from apo_jax.lab.pipeline import Settings
from apo_jax.lab.steps import run_step

log = logging.getLogger("apo_jax")
WORLD_FIELDS = ("seed", "n_sft", "sft_noise", "pair_prompts", "heldout")
TARGET_FIELDS = ("sft_steps", "sft_lr", "batch_size", "model")
PAIR_FIELDS = ("temperature", "pairs", "sources")
CELL_FIELDS = ("steps", "lr", "beta", "batch_size")
VERSION = 1  # bump when a step's code changes what it writes


def _key(s: Settings, fields: tuple[str, ...], **upstream: Any) -> dict[str, Any]:
    return {"version": VERSION, **{f: getattr(s, f) for f in fields}, **upstream}


def cells(s: Settings) -> list[tuple[str, str, int]]:
    """(source, objective, seed) of every training cell, in run order (seed-major)."""
    return [
        (src, obj, seed) for seed in range(s.seeds) for src in s.sources for obj in s.objectives
    ]


def run(out: str, s: Settings, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the lab into `out`; returns results.json's content."""
    os.makedirs(out, exist_ok=True)
    todo = cells(s)
    # The bar counts work in "cells" (one preference run of s.steps): the ETA is right early on.
    weight = {"world": 0.1, "target": s.sft_steps / 100, "pairs": 0.3}  # measured ratios
    cell = 1.0
    bar = tqdm(total=round(sum(weight.values()) + cell * len(todo), 1), unit="cell",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
               bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")  # fmt: skip
    started = time.perf_counter()
    ran = 0

    def step(name: str, key: dict[str, Any], fn) -> dict[str, Any]:
        nonlocal ran
        bar.set_description(name)
        result, did = run_step(os.path.join(out, name), key, fn)
        ran += did
        if did:
            bar.update(weight.get(name, cell))
        else:  # cached: no work done, so it must not speed up the ETA
            bar.total = round(bar.total - weight.get(name, cell), 1)
            bar.refresh()
        return result

    world_key = _key(s, WORLD_FIELDS)
    world_dir = os.path.join(out, "world")
    world = step("world", world_key, lambda d: pipeline.build_world(d, s))
    target_key = _key(s, TARGET_FIELDS, world=world_key)
    target = step("target", target_key, lambda d: pipeline.train_target(d, s, world_dir))
    target_hf = os.path.join(out, "target", target["hf"])
    pairs_key = _key(s, PAIR_FIELDS, target=target_key)
    pairs = step("pairs", pairs_key, lambda d: sources.build_pairs(d, s, world_dir, target_hf))
    heldout = os.path.join(world_dir, "heldout.jsonl")
    conditions = []
    for source, objective, seed in todo:
        name = os.path.join("cells", f"{source}-{objective}-s{seed}")
        shard_dir = os.path.join(out, "pairs", pairs["sources"][source]["shards"])
        key = _key(s, CELL_FIELDS, pairs=pairs_key, source=source, objective=objective, seed=seed)
        result = step(name, key, lambda d, sd=shard_dir, o=objective, se=seed: pipeline.train_cell(
            d, s, sd, target_hf, o, se, heldout))  # fmt: skip
        conditions.append({"dataset": source, "objective": objective, "seed": seed, **result,
                           "generations": os.path.join(name, result["generations"]),
                           "run": os.path.join(name, result["run"])})  # fmt: skip
    bar.close()
    meta = {"settings": dataclasses.asdict(s), "seconds": round(time.perf_counter() - started, 1),
            "steps_run": ran, "steps_total": 3 + len(todo),
            "step_seconds": step_seconds(world, target, pairs, conditions)}  # fmt: skip
    return report.write(out, meta, target, pairs, conditions)


def step_seconds(world, target, pairs, conditions) -> dict[str, float]:
    """Seconds each step took when it ran, and the full default grid's time estimated from them."""
    per_cell = sum(c["seconds"] for c in conditions) / max(len(conditions), 1)
    full = Settings()
    n_full = len(full.sources) * len(full.objectives) * full.seeds
    fixed = world["seconds"] + target["seconds"] + pairs["seconds"]
    return {"world": world["seconds"], "target": target["seconds"], "pairs": pairs["seconds"],
            "cell_mean": round(per_cell, 1), "cells": len(conditions),
            "full_grid_estimate": round(fixed * 2 + n_full * per_cell, 1)}  # fmt: skip
