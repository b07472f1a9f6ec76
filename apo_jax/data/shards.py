"""ArrayRecord shards of tokenized pairs: record serialization, writing, reading, fingerprints.

One record = ``int64[4]`` header ``(source_index, n_prompt, n_chosen, n_rejected)`` followed by
the ``int32`` token ids of prompt, chosen and rejected, little-endian. Shards are named
``pairs-00000.array_record`` ...; records are numbered globally in shard order (the *record
index* that the loader returns and reference log-probs are keyed by).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SHARD_PATTERN = "pairs-*.array_record"
_HEADER = np.dtype("<i8")
_TOKENS = np.dtype("<i4")


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """A tokenized pair as stored in a shard."""

    prompt: np.ndarray  # int32[P]
    chosen: np.ndarray  # int32[C], includes the end-of-turn token(s)
    rejected: np.ndarray  # int32[R]
    source_index: int


def serialize(rec: PairRecord) -> bytes:
    """Encodes a record as header + token bytes."""
    header = np.array(
        [rec.source_index, len(rec.prompt), len(rec.chosen), len(rec.rejected)], _HEADER
    )
    tokens = np.concatenate([rec.prompt, rec.chosen, rec.rejected]).astype(_TOKENS)
    return header.tobytes() + tokens.tobytes()


def deserialize(data: bytes) -> PairRecord:
    """Decodes bytes written by :func:`serialize`."""
    source_index, n_p, n_c, n_r = np.frombuffer(data, _HEADER, count=4).tolist()
    tokens = np.frombuffer(data, _TOKENS, offset=4 * _HEADER.itemsize).astype(np.int32)
    if tokens.size != n_p + n_c + n_r:
        raise ValueError(f"corrupt record: {tokens.size} tokens, header says {n_p + n_c + n_r}")
    return PairRecord(tokens[:n_p], tokens[n_p : n_p + n_c], tokens[n_p + n_c :], source_index)


class ShardWriter:
    """Writes records into rolling ArrayRecord shards of ``records_per_shard`` records."""

    def __init__(self, out_dir: str, records_per_shard: int = 10_000):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._cls, self.out_dir, self.records_per_shard = (
            ArrayRecordWriter,
            out_dir,
            records_per_shard,
        )
        self._writer: Any = None
        self.count, self.paths = 0, []

    def write(self, rec: PairRecord) -> int:
        """Appends a record; returns its global record index."""
        if self.count % self.records_per_shard == 0:
            self._close_current()
            path = os.path.join(self.out_dir, f"pairs-{len(self.paths):05d}.array_record")
            self._writer = self._cls(path, "group_size:1")  # group_size 1 = fast random access
            self.paths.append(path)
        self._writer.write(serialize(rec))
        self.count += 1
        return self.count - 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        """Closes the open shard; returns the shard paths written."""
        self._close_current()
        return self.paths


def shard_paths(shard_dir: str) -> list[str]:
    """Returns the shard files of a prepared directory, in record order."""
    paths = sorted(glob.glob(os.path.join(shard_dir, SHARD_PATTERN)))
    if not paths:
        raise FileNotFoundError(
            f"no {SHARD_PATTERN} files in {shard_dir!r}; run python -m apo_jax.data.prepare"
        )
    return paths


def file_sha256(path: str) -> str:
    """Returns the sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_fingerprint(shard_dir: str) -> str:
    """Returns a sha256 over the shard files' contents, in order: identifies the tokenized data."""
    h = hashlib.sha256()
    for path in shard_paths(shard_dir):
        h.update(os.path.basename(path).encode())
        h.update(bytes.fromhex(file_sha256(path)))
    return h.hexdigest()


def read_manifest(shard_dir: str) -> dict[str, Any]:
    """Returns the prepared directory's manifest.json as a dict."""
    with open(os.path.join(shard_dir, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def open_source(shard_dir: str) -> Any:
    """Returns a grain ``ArrayRecordDataSource`` over the directory's shards (bytes records)."""
    import grain

    return grain.sources.ArrayRecordDataSource(shard_paths(shard_dir))


def read_records(shard_dir: str) -> list[PairRecord]:
    """Reads every record of a prepared directory (small data, tests, stats)."""
    source = open_source(shard_dir)
    return [deserialize(source[i]) for i in range(len(source))]
