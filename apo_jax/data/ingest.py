"""Reading raw rows from JSONL (also gzipped), JSON, Parquet, `save_to_disk` dirs and HF datasets.

Rows are yielded raw (JSONL lines as bytes, so decoding errors become per-row rejects); the
validation into :class:`~apo_jax.data.schema.Pair` happens in :func:`parse_row`, usually in a
worker process. The CLAIR builders read their prompt files through the same functions.

A JSONL line longer than ``max_row_bytes`` is never held in memory: it is skipped as it is read
and comes back as an :class:`Oversize` payload, which :func:`decode_row` rejects as
``too_many_bytes``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

from apo_jax import errors
from apo_jax.data import schema

BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, dropped from the start of a file


class InputError(errors.UserError):
    """An input that cannot be read at all; the message names the file and what to fix."""


@dataclasses.dataclass(frozen=True)
class Oversize:
    """The payload of a JSONL line longer than the byte limit (the line itself is dropped)."""

    nbytes: int
    limit: int


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One raw input row: bytes (a JSONL line) or an already decoded object."""

    source_index: int
    file: str
    line: int
    payload: Any


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _skip_line(f: IO[bytes], head: bytes) -> int:
    """Reads past the rest of a long line in 1 MiB pieces; returns the line's length."""
    n, piece = len(head), head
    while piece and not piece.endswith(b"\n"):
        piece = f.readline(1 << 20)
        n += len(piece)
    return n - 1 if piece.endswith(b"\n") else n


def _jsonl_rows(path: str, max_row_bytes: int | None) -> Iterator[tuple[int, bytes | Oversize]]:
    limit = max_row_bytes + 1 if max_row_bytes else -1  # room for the newline
    try:
        with _open(path) as f:
            lineno = 0
            while raw := f.readline(limit):
                lineno += 1
                if lineno == 1 and raw.startswith(BOM):  # a UTF-8 byte order mark is not data
                    raw = raw[len(BOM) :]
                if len(raw) == limit and not raw.endswith(b"\n"):
                    yield lineno, Oversize(_skip_line(f, raw), max_row_bytes)
                elif not raw.isspace():
                    yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: damaged gzip file ({e})") from None


def _json_rows(path: str) -> Iterator[tuple[int, Any]]:
    with _open(path) as f:
        data = f.read().removeprefix(BOM)
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        yield from _jsonl_rows(path, None)  # a .json file that is really JSON lines
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


def _file_rows(path: str, split: str, max_row_bytes: int | None) -> Iterator[tuple[int, Any]]:
    if os.path.isdir(path) or (not os.path.exists(path) and _is_hub_name(path)):
        return _hf_rows(path, split)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (check permissions)")
    lower = path.lower().removesuffix(".gz")
    if lower.endswith(".parquet"):
        return _parquet_rows(path)
    if lower.endswith(".json"):
        return _json_rows(path)
    return _jsonl_rows(path, max_row_bytes)


def read_rows(
    inputs: str | Sequence[str], *, split: str = "train", max_row_bytes: int | None = None
) -> Iterator[RawRow]:
    """Yields every raw row of every input, in order, with a global source index.

    Args:
      inputs: paths to .jsonl/.jsonl.gz/.json/.parquet files, `save_to_disk` directories or
        hub dataset names ("org/name").
      split: the split to read from a DatasetDict or hub dataset.
      max_row_bytes: a JSONL line longer than this is not read into memory; its payload is an
        :class:`Oversize` (None: no limit).

    Raises:
      InputError: when an input cannot be opened or parsed at all.
    """
    inputs = check_inputs(inputs)
    return _read_rows(inputs, split, max_row_bytes)


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


def _read_rows(inputs: list[str], split: str, max_row_bytes: int | None) -> Iterator[RawRow]:
    index = 0
    for path in inputs:
        for line, payload in _file_rows(path, split, max_row_bytes):
            yield RawRow(index, str(path), line, payload)
            index += 1


def decode_row(raw: RawRow) -> Any:
    """The row's object: a JSONL line decoded as UTF-8 JSON, any other payload as it is.

    Raises:
      schema.RowError: ``too_many_bytes``, ``non_utf8`` or ``malformed_json`` (field ``<line>``).
    """
    payload = raw.payload
    if isinstance(payload, Oversize):
        detail = f"{payload.nbytes} bytes > max_row_bytes {payload.limit}"
        raise schema.RowError("<line>", schema.TOO_MANY_BYTES, detail)
    if not isinstance(payload, bytes):
        return payload
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise schema.RowError("<line>", schema.NON_UTF8, str(e)) from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise schema.RowError("<line>", schema.MALFORMED_JSON, str(e)) from None


def parse_row(raw: RawRow, fields: schema.FieldMap) -> schema.Pair | schema.Reject:
    """Decodes and validates one raw row; never raises for bad data."""
    try:
        return schema.to_pair(
            decode_row(raw), fields, source_index=raw.source_index, file=raw.file, line=raw.line
        )
    except schema.RowError as e:
        return schema.Reject(
            raw.source_index, raw.file, raw.line, e.field, e.reason, e.detail[:200]
        )
