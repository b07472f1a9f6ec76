"""Cached, resumable steps: each writes into its own directory and finishes with `done.json`.

A step is skipped when its `done.json` exists and records the same key (the settings and
upstream results it depends on); a step whose key changed is redone from an empty directory. The
marker is written last and atomically, so a step killed midway is never taken for done; a
training step stopped by a signal resumes from the checkpoint it saved, because its directory is
kept while the key matches (`key.json`, written first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

DONE, KEY = "done.json", "key.json"


def fingerprint(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Writes JSONL atomically."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def done_result(directory: str, key: Any) -> dict[str, Any] | None:
    """The result recorded by a finished step with this key, else None."""
    path = os.path.join(directory, DONE)
    if not os.path.exists(path):
        return None
    done = read_json(path)
    return done["result"] if done.get("fingerprint") == fingerprint(key) else None


def run_step(directory: str, key: Any, fn: Callable[[str], dict[str, Any]]) -> tuple[dict, bool]:
    """Runs `fn(directory)` unless done with `key`; returns (its result, whether it ran).

    `fn` writes its files into `directory` and returns a JSON-able result (paths relative).
    """
    result = done_result(directory, key)
    if result is not None:
        return result, False
    key_path = os.path.join(directory, KEY)
    if os.path.isdir(directory):
        same = os.path.exists(key_path) and read_json(key_path).get("fingerprint") == fingerprint(
            key
        )
        if not same:
            shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    write_json(key_path, {"fingerprint": fingerprint(key), "key": key})
    start = time.perf_counter()
    result = fn(directory)
    result["seconds"] = round(time.perf_counter() - start, 2)
    write_json(os.path.join(directory, DONE), {"fingerprint": fingerprint(key), "result": result})
    return result, True
