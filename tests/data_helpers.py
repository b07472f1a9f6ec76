"""Shared fixtures and helpers for the tests/test_data_*.py files (imported, not a test module)."""

from __future__ import annotations

import json
import os

import pytest

from apo_jax.data import demo, prepare


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


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """A small demo tokenizer (byte-level BPE, Llama-3 special tokens and chat template)."""
    rows = demo.generate_pairs(300, seed=1)
    texts = [m["content"] for r in rows for side in ("chosen", "rejected") for m in r[side]]
    return demo.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=512)


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory) -> tuple[str, list[dict]]:
    """A JSONL of 40 generated CLAIR pairs (some multi-turn) and its rows."""
    rows = demo.generate_pairs(40, seed=2)
    return write_jsonl(os.path.join(tmp_path_factory.mktemp("pairs"), "pairs.jsonl"), rows), rows


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, tok_dir, small_pairs) -> str:
    """small_pairs prepared into 3 shards (16 records each at most)."""
    out = str(tmp_path_factory.mktemp("shards"))
    prepare.prepare(
        small_pairs[0], tok_dir, out, prepare.Settings(max_length=256, records_per_shard=16)
    )
    return out
