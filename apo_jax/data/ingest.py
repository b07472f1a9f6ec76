"""Reading raw preference rows from JSONL, JSON, Parquet, `save_to_disk` dirs and HF datasets.

Rows are yielded raw (JSONL lines as bytes, so decoding errors become per-row rejects); the
validation into :class:`~apo_jax.data.schema.Pair` happens in :func:`parse_row`, usually in a
worker process.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from apo_jax.data import schema


class InputError(Exception):
    """An input that cannot be read at all; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One raw input row: bytes (a JSONL line) or an already decoded object."""

    source_index: int
    file: str
    line: int
    payload: Any


def _jsonl_rows(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, raw


def _json_rows(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        yield from _jsonl_rows(path)  # a .json file that is really JSON lines
        return
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: a JSON file must hold a list of rows (or one list field)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise InputError(
            f"{path}: a JSON file must hold a list of rows, found {type(obj).__name__}"
        )
    yield from enumerate(obj)


def _arrow_rows(table: Any) -> Iterator[tuple[int, Any]]:
    for batch in table.to_batches(max_chunksize=1024):
        yield from batch.to_pylist()


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    yield from enumerate(_arrow_rows(table))


def _hf_rows(spec: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        if os.path.isdir(spec):
            ds = datasets.load_from_disk(spec)
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as e:
        raise InputError(f"{spec}: cannot load as a dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{spec}: no split {split!r}; has {sorted(ds)} (use --split)")
        ds = ds[split]
    yield from enumerate(ds)


def _file_rows(path: str, split: str) -> Iterator[tuple[int, Any]]:
    if os.path.isdir(path):
        return _hf_rows(path, split)
    if not os.path.exists(path):
        if path.count("/") == 1 and not path.startswith((".", "/")):
            return _hf_rows(path, split)  # looks like a hub dataset name
        raise InputError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (check permissions)")
    lower = path.lower()
    if lower.endswith(".parquet"):
        return _parquet_rows(path)
    if lower.endswith(".json"):
        return _json_rows(path)
    return _jsonl_rows(path)


def read_rows(inputs: str | Sequence[str], *, split: str = "train") -> Iterator[RawRow]:
    """Yields every raw row of every input, in order, with a global source index.

    Args:
      inputs: paths to .jsonl/.json/.parquet files, `save_to_disk` directories or hub
        dataset names ("org/name").
      split: the split to read from a DatasetDict or hub dataset.

    Raises:
      InputError: when an input cannot be opened or parsed at all.
    """
    inputs = check_inputs(inputs)
    return _read_rows(inputs, split)


def _is_hub_name(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/"))


def check_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Returns the inputs as a list; raises InputError for a path that plainly does not exist."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    if not inputs:
        raise InputError("no input given")
    for path in inputs:
        if not os.path.exists(path) and not _is_hub_name(path):
            raise InputError(f"{path}: no such file or directory")
    return list(inputs)


def _read_rows(inputs: list[str], split: str) -> Iterator[RawRow]:
    index = 0
    for path in inputs:
        for line, payload in _file_rows(path, split):
            yield RawRow(index, str(path), line, payload)
            index += 1


def parse_row(raw: RawRow, fields: schema.FieldMap) -> schema.Pair | schema.Reject:
    """Decodes and validates one raw row; never raises for bad data."""
    payload = raw.payload
    try:
        if isinstance(payload, bytes):
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise schema.RowError("<line>", schema.NON_UTF8, str(e)) from None
            try:
                payload = json.loads(text)
            except ValueError as e:
                raise schema.RowError("<line>", schema.MALFORMED_JSON, str(e)) from None
        return schema.to_pair(
            payload, fields, source_index=raw.source_index, file=raw.file, line=raw.line
        )
    except schema.RowError as e:
        return schema.Reject(
            raw.source_index, raw.file, raw.line, e.field, e.reason, e.detail[:200]
        )
