"""The four pair sources, built from the target's own samples by the real CLAIR builders.

All sources share one request cache, so the target's answer to a prompt (the rejected side of
CLAIR and stronger-preferred pairs, the first sample of on-policy judge pairs) is one sample,
drawn once. The sources are then cut to the same prompts and the same count, prepared into
shards, and measured: contrastiveness (token Jaccard, character Levenshtein) and how often each
side is right by the checker.
"""

from __future__ import annotations

import os
import random
from typing import Any

from apo_jax.clair import builders, ledger
from apo_jax.clair.cache import RequestCache, user_turn
from apo_jax.clair.local import LocalBackend
from apo_jax.lab import backends, world
from apo_jax.lab.pipeline import MAX_NEW_TOKENS, OFFPOLICY_POOL
from apo_jax.lab.steps import write_jsonl


def _offpolicy_rows(rows: list[ledger.PromptRow], seed: int, w: Any = world) -> list[ledger.Row]:
    """UltraFeedback-style rows: answers of other models, rated for correctness and helpfulness."""
    answers = {}
    for name, style, accuracy in OFFPOLICY_POOL:
        if style not in w.STYLES:
            style = "plain"
        role = builders.Role(backends.Writer(name, style, accuracy, seed, w))
        answers[name] = role.complete([user_turn(r.prompt) for r in rows])
    out = []
    for i, row in enumerate(rows):
        rng = random.Random(f"{seed}:ratings:{row.line}")
        completions = []
        for name, _, _ in OFFPOLICY_POOL:
            text = answers[name][i]
            ratings = {
                "correctness": 10 if w.correct(row.prompt, text) else 1,
                "helpfulness": rng.randint(1, 5),
            }
            completions.append({"model": name, "response": text, "ratings": ratings})
        out.append(ledger.Row(row.line, {"prompt": row.prompt, "completions": completions}))
    return out


def build_all(
    d: str,
    s: Any,
    prompts_path: str,
    target_hf: str,
    w: Any = world,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 128,
) -> dict[str, ledger.BuildResult]:
    """Builds every source of `s.sources` into `d/<source>/all.jsonl` (+ rejects), answering
    from world `w` (`apo_jax.lab.world` or `apo_jax.lab.tasks`)."""
    cache = RequestCache(os.path.join(d, "requests.cache.jsonl"))
    params = {"temperature": s.temperature, "max_tokens": max_new_tokens, "seed": s.seed}
    target = builders.Role(
        LocalBackend(target_hf, name="target", batch_size=batch_size, cache=cache), params
    )
    results = {}
    for source in s.sources:
        result = ledger.BuildResult()
        rows = ledger.read_prompts(prompts_path, result)
        if source == "clair":
            reviser = builders.Role(backends.Reviser(w=w))
            builders.build_clair(rows, target, reviser, result)
        elif source == "stronger_preferred":
            strong = builders.Role(backends.Writer("strong-lm", "strong", 1.0, s.seed, w))
            builders.build_stronger_preferred(rows, target, strong, result)
        elif source == "onpolicy_judge":
            judge = builders.Role(backends.CheckerJudge(w=w))
            builders.build_onpolicy_judge(rows, target, judge, result, seed=s.seed)
        else:
            builders.build_offpolicy_judge(_offpolicy_rows(rows, s.seed, w), result, seed=s.seed)
        os.makedirs(os.path.join(d, source), exist_ok=True)
        result.write(os.path.join(d, source, "all.jsonl"), os.path.join(d, source, "rejects.jsonl"))
        results[source] = result
    cache.close()
    return results


def _side_correct(pair: dict[str, Any], side: str, w: Any = world) -> bool:
    return w.correct(pair["prompt"], pair[side][-1]["content"])


def build_pairs(
    d: str,
    s: Any,
    world_dir: str,
    target_hf: str,
    *,
    w: Any = world,
    tokenizer: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_length: int = 128,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Builds the sources, keeps the prompts every source has a pair for (the first `s.pairs`),
    prepares shards (with `tokenizer`, default the world's) and measures each source."""
    from apo_jax.data import prepare, stats

    results = build_all(
        d,
        s,
        os.path.join(world_dir, "pair_prompts.jsonl"),
        target_hf,
        w,
        max_new_tokens,
        batch_size,
    )
    common = sorted(set.intersection(*(set(r.pairs) for r in results.values())))[: s.pairs]
    if not common:
        raise RuntimeError("no prompt has a pair in every source; raise --pair_prompts")
    tokenizer = tokenizer or os.path.join(world_dir, "tokenizer")
    out: dict[str, Any] = {"pairs_per_source": len(common), "sources": {}}
    for source, result in results.items():
        pairs = [result.pairs[line] for line in common]
        write_jsonl(os.path.join(d, source, "train.jsonl"), pairs)
        shard_dir = os.path.join(d, source, "shards")
        manifest = prepare.prepare(
            os.path.join(d, source, "train.jsonl"),
            tokenizer,
            shard_dir,
            prepare.Settings(max_length=max_length),
        )
        st = stats.pair_stats(shard_dir)
        out["sources"][source] = {
            "built": len(result.pairs),
            "rejects": result.counts()["reject_reasons"],
            "prepared": manifest["counts"]["written"],
            "shards": f"{source}/shards",
            "jaccard": st["jaccard"]["mean"],
            "levenshtein": st["levenshtein"]["mean"],
            "jaccard_median": st["jaccard"]["median"],
            "levenshtein_median": st["levenshtein"]["median"],
            "chosen_correct": sum(_side_correct(p, "chosen", w) for p in pairs) / len(pairs),
            "rejected_correct": sum(_side_correct(p, "rejected", w) for p in pairs) / len(pairs),
        }
    return out
