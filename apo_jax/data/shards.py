"""ArrayRecord shards of tokenized pairs: record serialization, writing, reading, fingerprints.

One record = ``int64[4]`` header ``(source_index, n_prompt, n_chosen, n_rejected)`` followed by
the ``int32`` token ids of prompt, chosen and rejected, little-endian. An unpaired record
(:class:`UnpairedRecord`) has the header ``int64[6]`` ``(-2, source_index, n_prompt,
n_completion, n_kl, label)`` (the negative first word tells them apart) and the ids of prompt,
completion and KL completion. Shards are named
``pairs-00000.array_record`` ...; records are numbered globally in shard order (the *record
index* that the loader returns and reference log-probs are keyed by).

Integrity: the manifest records each shard's size, a sha256 of its first and last 64 KiB
(``sample_sha256``) and the sha256 of the whole file. :func:`verify` checks the sizes and sample
hashes (fast: reads 128 KiB a shard) or every byte (``full=True``); the reader that
:func:`open_source` returns turns a damaged file into a :class:`ShardError` naming it.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from apo_jax import errors

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SHARD_PATTERN = "pairs-*.array_record"
_HEADER = np.dtype("<i8")
_TOKENS = np.dtype("<i4")
_SAMPLE = 64 << 10  # bytes hashed at each end of a shard by sample_sha256


class ShardError(errors.UserError):
    """A shard directory that does not match its manifest, or a shard file that cannot be read."""


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """A tokenized pair as stored in a shard."""

    kind: ClassVar[str] = "pair"  # what a layout checks (apo_jax.layouts.base.Record)
    prompt: np.ndarray  # int32[P]
    chosen: np.ndarray  # int32[C], includes the end-of-turn token(s)
    rejected: np.ndarray  # int32[R]
    source_index: int


@dataclasses.dataclass(frozen=True)
class UnpairedRecord:
    """A tokenized unpaired example: one completion labelled desirable or not, and the KL
    completion (another record's completion) that makes its mismatched pair for the KL estimate.

    ``chosen`` and ``rejected`` name the completion and the KL completion, so the pair layouts
    and the reference pass read it as the pair (x, y) / (x, y'): stored reference log-probs of an
    unpaired record are ``chosen`` = log pi_ref(y|x) and ``rejected`` = log pi_ref(y'|x).
    """

    kind: ClassVar[str] = "unpaired"
    prompt: np.ndarray  # int32[P]
    completion: np.ndarray  # int32[C], includes the end-of-turn token(s)
    kl_completion: np.ndarray  # int32[K]
    label: bool  # True: desirable
    source_index: int

    @property
    def chosen(self) -> np.ndarray:
        return self.completion

    @property
    def rejected(self) -> np.ndarray:
        return self.kl_completion


_UNPAIRED = -2  # first header word of an unpaired record


def serialize(rec: PairRecord | UnpairedRecord) -> bytes:
    """Encodes a record as header + token bytes."""
    if isinstance(rec, UnpairedRecord):
        header = np.array(
            [
                _UNPAIRED,
                rec.source_index,
                len(rec.prompt),
                len(rec.completion),
                len(rec.kl_completion),
                int(rec.label),
            ],
            _HEADER,
        )
        tokens = np.concatenate([rec.prompt, rec.completion, rec.kl_completion]).astype(_TOKENS)
        return header.tobytes() + tokens.tobytes()
    header = np.array(
        [rec.source_index, len(rec.prompt), len(rec.chosen), len(rec.rejected)], _HEADER
    )
    tokens = np.concatenate([rec.prompt, rec.chosen, rec.rejected]).astype(_TOKENS)
    return header.tobytes() + tokens.tobytes()


def deserialize(data: bytes) -> PairRecord | UnpairedRecord:
    """Decodes bytes written by :func:`serialize`.

    Raises:
      ShardError: the bytes do not hold a record (header and token count disagree).
    """
    words = 6 if len(data) >= _HEADER.itemsize and _first_word(data) == _UNPAIRED else 4
    if len(data) < words * _HEADER.itemsize or (len(data) - words * 8) % _TOKENS.itemsize:
        raise ShardError(f"corrupt record of {len(data)} bytes; run apo_jax.data.shards.verify")
    header = np.frombuffer(data, _HEADER, count=words).tolist()
    tokens = np.frombuffer(data, _TOKENS, offset=words * _HEADER.itemsize).astype(np.int32)
    if words == 6:
        _, source_index, n_p, n_c, n_k, label = header
        if tokens.size != n_p + n_c + n_k:
            raise ShardError(
                f"corrupt record: {tokens.size} tokens, header says {n_p + n_c + n_k}; "
                "run apo_jax.data.shards.verify"
            )
        p, c, k = np.split(tokens, [n_p, n_p + n_c])
        return UnpairedRecord(p, c, k, bool(label), source_index)
    source_index, n_p, n_c, n_r = header
    if tokens.size != n_p + n_c + n_r:
        raise ShardError(
            f"corrupt record: {tokens.size} tokens, header says {n_p + n_c + n_r}; "
            "run apo_jax.data.shards.verify"
        )
    return PairRecord(tokens[:n_p], tokens[n_p : n_p + n_c], tokens[n_p + n_c :], source_index)


def _first_word(data: bytes) -> int:
    return int(np.frombuffer(data, _HEADER, count=1)[0])


@contextlib.contextmanager
def _write_errors(path: str) -> Iterator[None]:
    """The C++ writer's failures (RuntimeError, e.g. "write() failed: No space left on device")
    as an OSError naming the shard, like any other failed write."""
    try:
        yield
    except RuntimeError as e:
        code = errno.ENOSPC if "No space left" in str(e) else errno.EIO
        raise OSError(code, " ".join(str(e).split())[:300], path) from None


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

    def write(self, rec: PairRecord | UnpairedRecord) -> int:
        """Appends a record; returns its global record index."""
        if self.count % self.records_per_shard == 0:
            self._close_current()
            path = os.path.join(self.out_dir, f"pairs-{len(self.paths):05d}.array_record")
            self.paths.append(path)
            with _write_errors(path):
                self._writer = self._cls(path, "group_size:1")  # group_size 1: random access
        with _write_errors(self.paths[-1]):
            self._writer.write(serialize(rec))
        self.count += 1
        return self.count - 1

    def _close_current(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with _write_errors(self.paths[-1]):
                writer.close()

    def close(self) -> list[str]:
        """Closes the open shard; returns the shard paths written."""
        self._close_current()
        return self.paths


def shard_paths(shard_dir: str) -> list[str]:
    """Returns the shard files of a prepared directory, in record order.

    Raises:
      ShardError: the directory holds no shard file.
    """
    paths = sorted(glob.glob(os.path.join(shard_dir, SHARD_PATTERN)))
    if not paths:
        raise ShardError(
            f"no {SHARD_PATTERN} files in {shard_dir!r}; run python -m apo_jax.data.prepare"
        )
    return paths


def file_sha256(path: str) -> str:
    """Returns the sha256 hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sample_sha256(path: str) -> str:
    """Returns the sha256 of a file's size and its first and last 64 KiB (a fast fingerprint)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if size > _SAMPLE:
            f.seek(max(_SAMPLE, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def shard_entry(path: str, records: int) -> dict[str, Any]:
    """The manifest entry of a written shard: name, records, bytes and both hashes."""
    return {
        "file": os.path.basename(path),
        "records": records,
        "bytes": os.path.getsize(path),
        "sample_sha256": sample_sha256(path),
        "sha256": file_sha256(path),
    }


def _check_entry(shard_dir: str, entry: dict[str, Any], full: bool) -> None:
    path = os.path.join(shard_dir, entry["file"])
    fix = "re-run python -m apo_jax.data.prepare, or restore the file"
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard listed in {MANIFEST} is missing; {fix}")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ShardError(
            f"{path}: {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced); {fix}"
        )
    if sample_sha256(path) != entry["sample_sha256"]:
        raise ShardError(f"{path}: contents differ from {MANIFEST} (replaced or damaged); {fix}")
    if full and file_sha256(path) != entry["sha256"]:
        raise ShardError(f"{path}: sha256 differs from {MANIFEST} (damaged); {fix}")


def verify(shard_dir: str, *, full: bool = False) -> None:
    """Checks the shard files against the manifest; returns quietly when they match.

    Args:
      shard_dir: a prepared directory.
      full: also compare the sha256 of every byte (reads the whole files); otherwise only the
        sizes and the sample hashes of each file's ends are compared.

    Raises:
      ShardError: naming the first file that is missing, extra, truncated, replaced or damaged,
        or a manifest without the sizes and hashes (made by an older prepare).
    """
    try:
        entries = read_manifest(shard_dir)["shards"]
    except (OSError, ValueError, KeyError) as e:
        raise ShardError(
            f"{os.path.join(shard_dir, MANIFEST)}: cannot read the shard list "
            f"({type(e).__name__}: {e}); re-run python -m apo_jax.data.prepare"
        ) from None
    missing = [e["file"] for e in entries if "bytes" not in e or "sample_sha256" not in e]
    if missing:
        raise ShardError(
            f"{os.path.join(shard_dir, MANIFEST)} has no size or hash for "
            f"{missing[0]}; re-run python -m apo_jax.data.prepare"
        )
    listed = {e["file"] for e in entries}
    extra = [
        p
        for p in sorted(glob.glob(os.path.join(shard_dir, SHARD_PATTERN)))
        if os.path.basename(p) not in listed
    ]
    if extra:
        raise ShardError(f"{extra[0]}: shard not listed in {MANIFEST}; remove it or re-prepare")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # shards may sit on a network disk
        for future in [pool.submit(_check_entry, shard_dir, e, full) for e in entries]:
            future.result()


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


def _damaged(path: str, e: BaseException) -> ShardError:
    detail = " ".join(str(e).split()) or type(e).__name__
    return ShardError(
        f"{path}: damaged shard ({detail[:300]}); check it with "
        "apo_jax.data.shards.verify and re-run python -m apo_jax.data.prepare"
    )


def _count_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    except Exception as e:  # noqa: BLE001 - the C++ reader raises RuntimeError and friends
        raise _damaged(path, e) from None


class ShardSource:
    """Random access to the records of a shard list (grain's data source protocol).

    Wraps grain's ``ArrayRecordDataSource``; a read that fails raises :class:`ShardError`
    naming the shard file instead of the reader's bare ``RuntimeError``.
    """

    def __init__(self, paths: Sequence[str]):
        import grain

        with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:
            counts = list(pool.map(_count_records, paths))
        self.paths = list(paths)
        self._ends = np.cumsum(counts).tolist()
        # "path[start:end]" tells the source the record count, so it does not open every file again.
        ranges = [f"{p}[0:{n}]" for p, n in zip(paths, counts, strict=True)]
        self._source = grain.sources.ArrayRecordDataSource(ranges)

    def __len__(self) -> int:
        return len(self._source)

    def _path_of(self, index: int) -> str:
        return self.paths[bisect.bisect_right(self._ends, index)]

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._source[index]
        except Exception as e:  # noqa: BLE001 - see _count_records
            if isinstance(e, (IndexError, ValueError)) and not 0 <= index < len(self):
                raise
            raise _damaged(self._path_of(index), e) from None

    def __getitems__(self, indices: Sequence[int]) -> Sequence[bytes]:
        try:
            return self._source.__getitems__(indices)
        except Exception:  # noqa: BLE001 - read one by one to name the damaged file
            return [self[i] for i in indices]


def open_source(shard_dir: str) -> ShardSource:
    """Returns a grain data source over the directory's shards (bytes records).

    Raises:
      ShardError: a shard file cannot be opened (truncated or damaged), naming it.
    """
    return ShardSource(shard_paths(shard_dir))


def read_records(shard_dir: str) -> list[PairRecord | UnpairedRecord]:
    """Reads every record of a prepared directory (small data, tests, stats)."""
    source = open_source(shard_dir)
    return [deserialize(source[i]) for i in range(len(source))]


def record_kind(manifest: dict[str, Any]) -> str:
    """'pairs' or 'unpaired': what the records of a prepared directory are."""
    return str(manifest.get("records", "pairs"))
