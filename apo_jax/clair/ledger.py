"""Input rows, output pairs and rejects of the CLAIR and baseline builders.

Rows are read with the data package's reader (:func:`apo_jax.data.ingest.read_rows`: JSONL,
``.jsonl.gz``, JSON, Parquet, ``save_to_disk`` dirs), so a prompt file is read exactly as
``prepare`` reads pairs. Every input row ends up either in the pairs file or in the rejects
file, with its line number (1-based for JSONL, the 0-based row otherwise) and a stable
``reason``; :class:`BuildResult` keeps that ledger and writes both files atomically, so a rerun
rewrites them whole from the request cache (idempotent).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from apo_jax.data import ingest, schema

MAX_ROW_BYTES = 64 << 20  # an input line longer than this is rejected unread (too_many_bytes)

# Reject reasons besides the input ones shared with the data package (schema.MALFORMED_JSON,
# NON_UTF8, NOT_AN_OBJECT, TOO_MANY_BYTES, MISSING_FIELD, WRONG_TYPE, EMPTY_PROMPT) and the
# reply parsers' (prompts.NO_REVISION_MARKER, EMPTY_REVISION, NO_VERDICT).
REQUEST_FAILED = "request_failed"  # HTTP error, retries used up, or a local sampling error
EMPTY_ANSWER = "empty_answer"
UNCHANGED_REVISION = "unchanged_revision"  # the revision equals the answer: no signal
IDENTICAL_ANSWERS = "identical_answers"  # the two answers of a pair are the same
JUDGE_TIE = "judge_tie"
TOO_FEW_SCORED = "too_few_scored_completions"
SCORE_TIE = "score_tie"  # no completion scores below the best


@dataclasses.dataclass(frozen=True)
class Row:
    """One input row that decoded as a JSON object."""

    line: int  # 1-based line (JSONL) or 0-based row (other formats)
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """A row with its prompt string read."""

    line: int
    record: dict[str, Any]
    prompt: str


def chat_pair(prompt: str, chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    """A pair in the data pipeline's input format (string prompt, chosen/rejected as chats)."""
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": rejected},
        ],
        **extra,
    }


@dataclasses.dataclass
class BuildResult:
    """Pairs and rejects of one build, keyed by input line."""

    pairs: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    rejects: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def add(self, line: int, pair: dict[str, Any]) -> None:
        """Records the pair built from input ``line``."""
        self.pairs[line] = pair

    def reject(
        self, line: int, record: Any, reason: str, stage: str, detail: str = "", **extra: Any
    ) -> None:
        """Records why input ``line`` produced no pair: a stable ``reason`` and a ``detail``."""
        self.rejects[line] = {"line": line, "stage": stage, "reason": reason, "detail": detail}
        self.rejects[line].update(input=record, **extra)

    def counts(self) -> dict[str, Any]:
        """Counts of pairs and of rejects per ``stage: reason``."""
        reasons = Counter(f"{r['stage']}: {r['reason']}" for r in self.rejects.values())
        return {
            "written": len(self.pairs),
            "rejected": len(self.rejects),
            "reject_reasons": dict(sorted(reasons.items())),
        }

    def write(
        self, pairs_path: str, rejects_path: str, redact: Callable[[Any], Any] | None = None
    ) -> None:
        """Writes pairs and rejects as JSONL in input order, each file atomically.

        Args:
          pairs_path, rejects_path: the two output files.
          redact: applied to every record before it is written (e.g. a ``keys.Redactor``).
        """
        redact = redact or (lambda record: record)
        _write_jsonl(pairs_path, (redact(self.pairs[k]) for k in sorted(self.pairs)))
        _write_jsonl(rejects_path, (redact(self.rejects[k]) for k in sorted(self.rejects)))


def _write_jsonl(path: str, records: Iterator[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _input_text(raw: ingest.RawRow) -> Any:
    if isinstance(raw.payload, bytes):
        return raw.payload.decode("utf-8", "replace").rstrip("\n")
    return None if isinstance(raw.payload, ingest.Oversize) else raw.payload


def read_objects(path: str, result: BuildResult) -> list[Row]:
    """Reads the JSON objects of an input; rows that are not one go to ``result`` as rejects.

    Raises:
      ingest.InputError: the input is missing or unreadable as a whole.
    """
    rows = []
    for raw in ingest.read_rows(path, max_row_bytes=MAX_ROW_BYTES):
        try:
            record = ingest.decode_row(raw)
        except schema.RowError as e:
            result.reject(raw.line, _input_text(raw), e.reason, "input", e.detail[:200])
            continue
        if not isinstance(record, dict):
            result.reject(raw.line, record, schema.NOT_AN_OBJECT, "input", type(record).__name__)
            continue
        rows.append(Row(raw.line, record))
    return rows


def read_prompts(path: str, result: BuildResult, field: str = "prompt") -> list[PromptRow]:
    """Reads rows whose ``field`` is a non-empty string; others are rejected with the reason."""
    out = []
    for row in read_objects(path, result):
        prompt = row.record.get(field)
        if prompt is None:
            result.reject(row.line, row.record, schema.MISSING_FIELD, "input", f"field '{field}'")
        elif not isinstance(prompt, str):
            detail = f"field '{field}' is {type(prompt).__name__}, not a string"
            result.reject(row.line, row.record, schema.WRONG_TYPE, "input", detail)
        elif not prompt.strip():
            result.reject(row.line, row.record, schema.EMPTY_PROMPT, "input", f"field '{field}'")
        else:
            out.append(PromptRow(row.line, row.record, prompt))
    return out
