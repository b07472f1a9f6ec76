"""The lab on a real instruct target, step by step, each step cached (`apo_jax.lab.steps`).

world (task splits) -> screen (the target's validation accuracy per family; families kept in
(0.15, 0.85), one held out) -> target (its greedy test answers) -> pairs (all sources, aligned)
-> lr (a validation sweep outside --quick, cached; --quick reads a cached one or uses the stated
default) -> one cell per (source, objective, seed) -> results.json and report.md.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from typing import Any

from tqdm import tqdm

from apo_jax.lab import real, report
from apo_jax.lab.real import RealSettings
from apo_jax.lab.steps import read_json, run_step

VERSION = 3  # bump when a step's code changes what it writes
WORLD = ("seed", "families", "val_per_family", "pair_prompts_per_family", "test")
SCREEN = ("max_new_tokens", "low", "high", "heldout_family")
PAIRS = ("temperature", "pairs", "sources", "max_length")
CELL = ("steps", "beta", "batch_size", "lora_rank", "full")


def _key(s: RealSettings, fields: tuple[str, ...], **upstream: Any) -> dict[str, Any]:
    return {"version": VERSION, **{f: getattr(s, f) for f in fields}, **upstream}


def cells(s: RealSettings) -> list[tuple[str, str, int]]:
    return [(src, o, seed) for seed in range(s.seeds) for src in s.sources for o in s.objectives]


def machine() -> dict[str, str]:
    """The CPU (lscpu's model name), the core count, the load and the commit."""
    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "commit": commit or "unknown",
    }


def run(
    out: str, s: RealSettings, target: str, *, sweep: bool, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Runs (or resumes) the real-target lab into `out`; returns results.json's content."""
    os.makedirs(out, exist_ok=True)
    target_hf = real.resolve_target(target)
    todo = cells(s)
    bar = tqdm(
        total=4 + len(todo) + (len(s.lr_sweep) if sweep else 0),
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    started, ran, at_start = time.perf_counter(), 0, machine()  # the commit that runs

    def step(name: str, key: dict[str, Any], fn) -> dict[str, Any]:
        nonlocal ran
        bar.set_description(name)
        result, did = run_step(os.path.join(out, name), key, fn)
        ran += did
        bar.update(1)
        return result

    wkey = _key(s, WORLD)
    world_dir = os.path.join(out, "world")
    step("world", wkey, lambda d: real.build_world(d, s))
    skey = _key(s, SCREEN, world=wkey, target=os.path.abspath(target_hf))
    screen_dir = os.path.join(out, "screen")
    screen = step("screen", skey, lambda d: real.screen(d, s, world_dir, target_hf))
    base = step("target", skey, lambda d: real.baseline(d, s, screen_dir, target_hf))
    pkey = _key(s, PAIRS, screen=skey)
    pairs = step("pairs", pkey, lambda d: real.build_pairs(d, s, screen_dir, target_hf))
    lr, lr_info = _learning_rate(out, s, pkey, pairs, target_hf, screen_dir, sweep, step)
    conditions = []
    test = os.path.join(screen_dir, "test.jsonl")
    for source, objective, seed in todo:
        name = os.path.join("cells", f"{source}-{objective}-s{seed}")
        shards = os.path.join(out, "pairs", pairs["sources"][source]["shards"])
        key = _key(s, CELL, pairs=pkey, lr=lr, source=source, objective=objective, seed=seed)
        result = step(
            name,
            key,
            lambda d, sd=shards, o=objective, se=seed: real.train_cell(
                d, s, sd, target_hf, o, se, lr, test
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
    bar.close()
    meta = {
        "settings": {**dataclasses.asdict(s), "lr": lr, "model": target, "target_hf": target_hf},
        "real": {
            "screen": screen,
            "lr": lr_info,
            "machine": {**at_start, "load_start": at_start["load"], "load": machine()["load"]},
            "command": command,
            "target_families": base["families"],
            "phases": phases(screen, base, pairs, lr_info, conditions),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "steps_run": ran,
        "steps_total": 4 + len(todo) + len(lr_info.get("sweep", {})),
        "step_seconds": {
            "world": 0,
            "target": base["seconds"],
            "pairs": pairs["seconds"],
            "cell_mean": round(sum(c["seconds"] for c in conditions) / max(len(conditions), 1), 1),
            "cells": len(conditions),
            "full_grid_estimate": 0,
        },
    }
    return report.write(out, meta, {"generations": base["generations"]}, pairs, conditions)


def _learning_rate(out, s, pkey, pairs, target_hf, screen_dir, sweep, step):
    """(lr, info): the sweep's choice (run here when `sweep`, else read from a cached sweep of
    the same pairs), or the stated default."""
    val = os.path.join(screen_dir, "val.jsonl")
    if sweep:
        runs = {}
        for lr in s.lr_sweep:
            name = os.path.join("sweep", f"lr{lr:g}")
            key = _key(s, CELL, pairs=pkey, lr=lr, source="clair", objective="apo_zero", seed=0)
            shards = os.path.join(out, "pairs", pairs["sources"]["clair"]["shards"])
            r = step(
                name,
                key,
                lambda d, lr=lr, sd=shards: real.train_cell(
                    d, s, sd, target_hf, "apo_zero", 0, lr, val
                ),
            )
            runs[f"{lr:g}"] = {"val_accuracy": r["accuracy"], "seconds": r["seconds"]}
        best = max(runs, key=lambda k: (runs[k]["val_accuracy"], -abs(float(k) - s.lr)))
        info = {
            "chosen": float(best),
            "how": "validation sweep (CLAIR, APO-zero, seed 0)",
            "sweep": runs,
        }
        from apo_jax.lab.steps import write_json

        write_json(os.path.join(out, "sweep", "chosen.json"), {"pairs": pkey, **info})
        return float(best), info
    cached = os.path.join(out, "sweep", "chosen.json")
    if os.path.exists(cached) and read_json(cached).get("pairs") == pkey:
        info = read_json(cached)
        info.pop("pairs")
        return info["chosen"], {**info, "how": "cached " + info["how"]}
    return s.lr, {"chosen": s.lr, "how": "stated default (no cached sweep; --quick runs none)"}


def phases(screen, base, pairs, lr_info, conditions) -> dict[str, float]:
    """Seconds per phase (as run; cached steps keep the time they took when they ran)."""
    return {
        "screening (greedy, validation)": screen["seconds"],
        "target evaluation (greedy, test)": base["seconds"],
        "sampling and pairs": pairs["seconds"],
        "lr sweep": sum(r["seconds"] for r in lr_info.get("sweep", {}).values()),
        "training (reference pass included)": round(
            sum(c.get("train_seconds", 0) for c in conditions), 1
        ),
        "evaluation of cells": round(sum(c.get("eval_seconds", 0) for c in conditions), 1),
    }
