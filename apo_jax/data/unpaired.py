"""Unpaired preference data (TRL's KTO layout): detection, tokenization, KL pairs, demo split.

A row ``{"prompt": ..., "completion": ..., "label": true|false}`` (TRL standard or
conversational) becomes an :class:`~apo_jax.data.shards.UnpairedRecord` through the same
validation, chat-template rendering, length policy and reject reasons as a pair (the completion
is tokenized as a pair whose two sides are the completion).

The KL term of KTO is estimated from mismatched pairs (x_i, y'_i). As TRL builds them, the
written records are cut into consecutive groups of ``kl_group`` (TRL: the per-device batch size)
and the completions rotate by one within each group: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
Each record stores its KL completion, so the reference pass can precompute its log-prob; a KL
completion longer than its prompt leaves room for is cut to fit ``max_length`` (TRL truncates the
KL sequence the same way, keeping its start).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from apo_jax.data import ingest, schema, shards, tokenize

RECORDS = ("pairs", "unpaired")


def detect(
    rows: Iterable[ingest.RawRow], fields: schema.FieldMap
) -> tuple[str, Iterator[ingest.RawRow]]:
    """('unpaired' | 'pairs', the same rows): unpaired when the first decodable row has the
    completion and label fields and no chosen field."""
    it = iter(rows)
    head: list[ingest.RawRow] = []
    kind = "pairs"
    for raw in it:
        head.append(raw)
        try:
            row = ingest.decode_row(raw)
        except schema.RowError:
            continue
        if isinstance(row, Mapping):
            if fields.label in row and fields.completion in row and fields.chosen not in row:
                kind = "unpaired"
            break
    return kind, itertools.chain(head, it)


def encode_row(
    tok: Any,
    raw: ingest.RawRow,
    fields: schema.FieldMap,
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
) -> tuple:
    """("ok", (prompt_ids, completion_ids, label, source_index), None) or ("reject", Reject)."""
    try:
        ex = schema.to_unpaired(
            ingest.decode_row(raw),
            fields,
            source_index=raw.source_index,
            file=raw.file,
            line=raw.line,
        )
        as_pair = schema.Pair(
            ex.prompt, ex.completion, ex.completion, ex.source_index, ex.file, ex.line
        )
        p, c, _ = tokenize.encode_pair(
            tok,
            as_pair,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
        )
    except schema.RowError as e:
        field = fields.completion if e.field in ("chosen", "rejected") else e.field
        return (
            "reject",
            schema.Reject(raw.source_index, raw.file, raw.line, field, e.reason, e.detail[:200]),
        )
    return ("ok", (p, c, ex.label, raw.source_index), None)


def with_kl(
    items: Iterable[tuple[np.ndarray, np.ndarray, bool, int]], kl_group: int, max_length: int
) -> Iterator[shards.UnpairedRecord]:
    """Records with KL completions: completions rotated by one within groups of ``kl_group``."""
    group: list = []
    for item in itertools.chain(items, [None]):
        if item is not None:
            group.append(item)
            if len(group) < kl_group:
                continue
        for i, (p, c, label, source_index) in enumerate(group):
            kl = group[i - 1][1][: max_length - len(p)]  # i - 1 = -1: the group's last one
            yield shards.UnpairedRecord(p, c, np.asarray(kl, np.int32), label, source_index)
        group = []


def unpair_rows(rows: Iterable[Mapping[str, Any]], batch_size: int = 1000) -> list[dict]:
    """Pairs -> unpaired rows as TRL's ``unpair_preference_dataset`` makes them: per block of
    ``batch_size`` pairs, their chosen completions (label True), then their rejected ones."""
    rows, out = list(rows), []
    for start in range(0, len(rows), batch_size):
        block = rows[start : start + batch_size]
        for side, label in (("chosen", True), ("rejected", False)):
            out += [{"prompt": r["prompt"], "completion": r[side], "label": label} for r in block]
    return out


def unpair_file(src: str, dst: str) -> str:
    """Writes the unpaired rows of a pairs JSONL file (:func:`unpair_rows`) to ``dst``."""
    with open(src, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with open(dst + ".tmp", "w", encoding="utf-8") as f:
        for r in unpair_rows(rows):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(dst + ".tmp", dst)
    return dst
