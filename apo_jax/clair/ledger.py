"""Input rows, output pairs and rejects of the CLAIR and baseline builders.

Every input line ends up either in the pairs file or in the rejects file, with its 1-based line
number; :class:`BuildResult` keeps that ledger and writes both files atomically, so a rerun
rewrites them whole from the request cache (idempotent).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any


class InputError(Exception):
    """Unusable input as a whole (missing file, unreadable bytes); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One input line that parsed as a JSON object."""

    line: int  # 1-based
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

    def reject(self, line: int, record: Any, reason: str, stage: str, **extra: Any) -> None:
        """Records why input ``line`` produced no pair."""
        self.rejects[line] = {"line": line, "stage": stage, "reason": reason, "input": record}
        self.rejects[line].update(extra)

    def counts(self) -> dict[str, Any]:
        """Counts of pairs and of rejects per stage and reason."""
        reasons = Counter(
            f"{r['stage']}: {_reason_kind(r['reason'])}" for r in self.rejects.values()
        )
        return {
            "written": len(self.pairs),
            "rejected": len(self.rejects),
            "reject_reasons": dict(sorted(reasons.items())),
        }

    def write(self, pairs_path: str, rejects_path: str) -> None:
        """Writes pairs and rejects as JSONL in input order, each file atomically."""
        _write_jsonl(pairs_path, (self.pairs[k] for k in sorted(self.pairs)))
        _write_jsonl(rejects_path, (self.rejects[k] for k in sorted(self.rejects)))


def _reason_kind(reason: str) -> str:
    # Group "HTTP 400: <body>" and similar by their stable head.
    return reason.split(":", 1)[0]


def _write_jsonl(path: str, records: Iterator[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_rows(path: str, result: BuildResult) -> list[Row]:
    """Reads JSON objects from a JSONL file; bad lines go to ``result`` as rejects.

    Raises:
      InputError: the file is missing or unreadable.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"{path}: cannot read input ({err.strerror})") from None
    rows = []
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", "replace")
        try:
            record = json.loads(raw)
        except ValueError as err:
            result.reject(line_no, text, f"malformed JSON: {err}", stage="input")
            continue
        if not isinstance(record, dict):
            result.reject(line_no, record, "not a JSON object", stage="input")
            continue
        rows.append(Row(line_no, record))
    return rows


def read_prompts(path: str, result: BuildResult, field: str = "prompt") -> list[PromptRow]:
    """Reads rows whose ``field`` is a non-empty string; others are rejected with the reason."""
    out = []
    for row in read_rows(path, result):
        prompt = row.record.get(field)
        if not isinstance(prompt, str) or not prompt.strip():
            why = "missing" if prompt is None else "empty or not a string"
            result.reject(row.line, row.record, f"field '{field}' {why}", stage="input")
            continue
        out.append(PromptRow(row.line, row.record, prompt))
    return out
