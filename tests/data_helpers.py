"""Helpers shared by the data tests (imported, not a test module); the fixtures are in conftest.py."""

from __future__ import annotations

import json


def write_jsonl(path: str, rows: list) -> str:
    """Writes rows as JSON lines (bytes rows are written verbatim); returns the path."""
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return str(path)


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    """A CLAIR-layout row: string prompt, chosen/rejected as [user, assistant] message lists."""
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }
