"""The whole lab, step by step, each step cached (`apo_jax.lab.steps`), with one progress bar.

world -> target -> pairs (all sources, aligned) -> one training cell per (source, objective,
seed) -> with `rounds` > 1, the CLAIR cell's model as the next target (CLAIR pairs of its own
samples, one cell), once per later round -> results.json and report.md. Rerunning with the same settings skips every finished step;
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

from apo_jax.lab import analysis, pipeline, report, sources
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
    extra = (s.rounds - 1) * (0.15 + cell)  # each later round: CLAIR pairs and one cell
    bar = tqdm(
        total=round(sum(weight.values()) + cell * len(todo) + extra, 1),
        unit="cell",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )
    started = time.perf_counter()
    ran = 0

    def step(name: str, key: dict[str, Any], fn, w: float | None = None) -> dict[str, Any]:
        nonlocal ran
        w = weight.get(name, cell) if w is None else w
        bar.set_description(name)
        result, did = run_step(os.path.join(out, name), key, fn)
        ran += did
        if did:
            bar.update(w)
        else:  # cached: no work done, so it must not speed up the ETA
            bar.total = round(bar.total - w, 1)
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
        result = step(
            name,
            key,
            lambda d, sd=shard_dir, o=objective, se=seed: pipeline.train_cell(
                d, s, sd, target_hf, o, se, heldout
            ),
        )
        conditions.append(
            {
                "dataset": source,
                "objective": objective,
                "seed": seed,
                **result,
                "generations": os.path.join(name, result["generations"]),
                "run": os.path.join(name, result["run"]),
            }
        )
    chain, extra_steps = [], 2 * (s.rounds - 1)
    if s.rounds > 1:
        # Round 1 is the CLAIR cell with the prescribed APO variant, seed 0 (from the grid, or
        # trained here under the grid's name and key when the grid lacks it).
        clair = pairs["sources"]["clair"]
        objective = analysis.expected_apo(clair["chosen_correct"], target["accuracy"])
        name = os.path.join("cells", f"clair-{objective}-s0")
        key = _key(s, CELL_FIELDS, pairs=pairs_key, source="clair", objective=objective, seed=0)
        shard_dir = os.path.join(out, "pairs", clair["shards"])
        result = next(
            (
                c
                for c in conditions
                if c["dataset"] == "clair" and c["objective"] == objective and c["seed"] == 0
            ),
            None,
        )
        if result is None:
            bar.total = round(bar.total + cell, 1)
            extra_steps += 1
            result = step(
                name,
                key,
                lambda d: pipeline.train_cell(d, s, shard_dir, target_hf, objective, 0, heldout),
            )
        hf = os.path.join(out, name, os.path.basename(result["run"]), "hf")
        chain.append(
            {
                "round": 1,
                "objective": objective,
                "pairs": pairs["pairs_per_source"],
                "chosen_correct": clair["chosen_correct"],
                "seconds": result["seconds"],
                "generations": os.path.join(name, os.path.basename(result["generations"])),
            }
        )
        for r in range(2, s.rounds + 1):
            # The previous round's model is the target: re-sample, revise, prepare, then a cell
            # whose reference pass runs on its weights (train_cell starts from `hf`).
            rdir = os.path.join("rounds", f"r{r}")
            pkey = _key(s, ("temperature", "pairs"), previous=key, round=r)
            rpairs = step(
                os.path.join(rdir, "pairs"),
                pkey,
                lambda d, h=hf: sources.build_pairs(
                    d, dataclasses.replace(s, sources=("clair",)), world_dir, h
                ),
                w=0.15,
            )
            rclair = rpairs["sources"]["clair"]
            shard_dir = os.path.join(out, rdir, "pairs", rclair["shards"])
            key = _key(s, CELL_FIELDS, pairs=pkey, objective=objective, seed=0)
            name = os.path.join(rdir, "cell")
            result = step(
                name,
                key,
                lambda d, sd=shard_dir, h=hf: pipeline.train_cell(
                    d, s, sd, h, objective, 0, heldout
                ),
            )
            hf = os.path.join(out, name, result["run"], "hf")
            chain.append(
                {
                    "round": r,
                    "objective": objective,
                    "pairs": rpairs["pairs_per_source"],
                    "chosen_correct": rclair["chosen_correct"],
                    "seconds": result["seconds"],
                    "generations": os.path.join(name, result["generations"]),
                }
            )
    bar.close()
    meta = {
        "settings": dataclasses.asdict(s),
        "seconds": round(time.perf_counter() - started, 1),
        "steps_run": ran,
        "steps_total": 3 + len(todo) + extra_steps,
        "step_seconds": step_seconds(world, target, pairs, conditions),
    }
    return report.write(out, meta, target, pairs, conditions, chain)


def step_seconds(world, target, pairs, conditions) -> dict[str, float]:
    """Seconds each step took when it ran, and the full default grid's time estimated from them."""
    per_cell = sum(c["seconds"] for c in conditions) / max(len(conditions), 1)
    full = Settings()
    n_full = len(full.sources) * len(full.objectives) * full.seeds
    fixed = world["seconds"] + target["seconds"] + pairs["seconds"]
    return {
        "world": world["seconds"],
        "target": target["seconds"],
        "pairs": pairs["seconds"],
        "cell_mean": round(per_cell, 1),
        "cells": len(conditions),
        "full_grid_estimate": round(fixed * 2 + n_full * per_cell, 1),
    }
