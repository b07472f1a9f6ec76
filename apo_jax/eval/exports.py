"""Generations in the formats benchmark scorers read (``--format=alpaca_eval,arena_hard,mixeval``).

- ``alpaca_eval``: ``<out>/alpaca_eval.json``, a JSON list of ``{instruction, output, generator}``
  (plus the input row's ``dataset`` when present), scored by ``alpaca_eval evaluate
  --model_outputs=<out>/alpaca_eval.json``.
- ``arena_hard``: ``<out>/arena_hard/<model_name>.jsonl``, Arena-Hard-Auto v2 answer lines
  ``{uid, ans_id, model, messages, tstamp, metadata: {token_len}}`` whose last message is the
  assistant's ``{"content": {"answer": ...}}``; copied into ``data/<bench>/model_answer/``.
- ``mixeval``: MixEval's response files, every input field kept plus ``response``, split by
  ``problem_type`` into ``<model>_close_freeform[_hard].jsonl`` and
  ``<model>_close_multichoice[_hard].jsonl`` under
  ``<out>/mixeval/<model>/<benchmark>/<version>/``, scored by ``python -m mix_eval.compute_metrics``.

docs/evaluation.md gives each scorer's full command.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from apo_jax.errors import UserError
from apo_jax.eval.prompts import Example

FORMATS = ("alpaca_eval", "arena_hard", "mixeval")
MIXEVAL_BENCHMARKS = ("mixeval", "mixeval_hard")


class ExportError(UserError):
    """An export that the rows or settings cannot satisfy."""


def check_formats(
    formats: Sequence[str], num_samples: int, mixeval_benchmark: str = "mixeval_hard"
) -> None:
    """Raises ExportError for an unknown format or MixEval benchmark, or for several samples per
    prompt."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"--format: unknown {unknown}; choose from {list(FORMATS)}")
    if formats and num_samples != 1:
        raise ExportError("--format exports one response per prompt: use --num_samples=1")
    if "mixeval" in formats:
        _mixeval_suffix(mixeval_benchmark)


def instruction(ex: Example) -> str:
    """The prompt as one string: the string as given, or the chat's last user turn."""
    return ex.prompt if isinstance(ex.prompt, str) else ex.messages[-1]["content"]


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def alpaca_eval(out: str, pairs: Sequence[tuple[Example, dict]], model_name: str) -> list[str]:
    """Writes <out>/alpaca_eval.json; returns the paths written."""
    rows = []
    for ex, gen in pairs:
        row = {"instruction": instruction(ex), "output": gen["response"], "generator": model_name}
        if "dataset" in ex.record:
            row["dataset"] = ex.record["dataset"]
        rows.append(row)
    path = os.path.join(out, "alpaca_eval.json")
    _write_json(path, rows)
    return [path]


def arena_hard(out: str, pairs: Sequence[tuple[Example, dict]], model_name: str) -> list[str]:
    """Writes <out>/arena_hard/<model_name>.jsonl (Arena-Hard-Auto v2 answers)."""
    now = time.time()
    rows = []
    for ex, gen in pairs:
        rows.append(
            {
                "uid": ex.id,
                # stable across reruns, so re-exporting does not look like a new answer
                "ans_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_name}/{ex.id}").hex,
                "model": model_name,
                "messages": [
                    *ex.messages,
                    {"role": "assistant", "content": {"answer": gen["response"]}},
                ],
                "tstamp": now,
                "metadata": {"token_len": gen["num_tokens"]},
            }
        )
    path = os.path.join(out, "arena_hard", f"{model_name}.jsonl")
    _write_jsonl(path, rows)
    return [path]


def check_rows(formats: Sequence[str], examples: Sequence[Example]) -> None:
    """Refuses, before anything is generated, rows an export cannot take."""
    if "mixeval" in formats:
        for ex in examples:
            _mixeval_split(ex)


def _mixeval_suffix(benchmark: str) -> str:
    if benchmark not in MIXEVAL_BENCHMARKS:
        raise ExportError(
            f"--mixeval_benchmark must be one of {MIXEVAL_BENCHMARKS}, got {benchmark!r}"
        )
    return "_hard" if benchmark == "mixeval_hard" else ""


def _mixeval_split(ex: Example) -> str:
    kind = ex.record.get("problem_type")
    if not isinstance(kind, str):
        raise ExportError(
            f"--format=mixeval: row id {ex.id!r} has no problem_type; MixEval rows say "
            "'free-form' or 'single-choice' (prepare them as docs/evaluation.md shows)"
        )
    return "close_freeform" if kind == "free-form" else "close_multichoice"


def mixeval(
    out: str,
    pairs: Sequence[tuple[Example, dict]],
    model_name: str,
    *,
    benchmark: str = "mixeval_hard",
    version: str = "2024-06-01",
) -> list[str]:
    """Writes MixEval's free-form and multiple-choice response files; returns their paths."""
    suffix = _mixeval_suffix(benchmark)
    splits: dict[str, list[dict]] = {"close_freeform": [], "close_multichoice": []}
    for ex, gen in pairs:
        splits[_mixeval_split(ex)].append({**ex.record, "id": ex.id, "response": gen["response"]})
    base = os.path.join(out, "mixeval", model_name, benchmark, version)
    paths = []
    for split, rows in splits.items():
        if rows:
            paths.append(os.path.join(base, f"{model_name}_{split}{suffix}.jsonl"))
            _write_jsonl(paths[-1], rows)
    return paths


def write(
    formats: Sequence[str],
    out: str,
    pairs: Sequence[tuple[Example, dict]],
    model_name: str,
    *,
    mixeval_benchmark: str = "mixeval_hard",
    mixeval_version: str = "2024-06-01",
) -> dict[str, list[str]]:
    """Writes every requested format; returns {format: [paths]}."""
    written = {}
    for fmt in formats:
        if fmt == "alpaca_eval":
            written[fmt] = alpaca_eval(out, pairs, model_name)
        elif fmt == "arena_hard":
            written[fmt] = arena_hard(out, pairs, model_name)
        elif fmt == "mixeval":
            written[fmt] = mixeval(
                out, pairs, model_name, benchmark=mixeval_benchmark, version=mixeval_version
            )
    return written
