"""Reference log-probs stored beside the shards, keyed by record index and shard fingerprint.

Each reference gets its own file, ``reference_logps-<key>.npz``, where the key hashes the caller's
fingerprint info (everything that changes the log-probs: reference weights, tokenizer, sequence
length and truncation, dtype), so runs with other references keep theirs side by side and never
overwrite one another. A file holds ``index int64[M]``, ``chosen float32[M]``,
``rejected float32[M]`` and ``meta`` (JSON: the shard fingerprint, the record count and the
fingerprint info). It is written under a unique temporary name and renamed, so a reader never sees
half a file and concurrent writers of the same key leave one whole file. Loading refuses a file
made for other shards, other fingerprint info, or one that misses records. When the shard
directory is read-only the file goes to the run's workdir, in a directory of its own for each
shard directory (``store_dir``), where loading given that workdir looks too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from apo_jax.data import shards
from apo_jax.errors import UserError

REFERENCE_PREFIX = "reference_logps"


class ReferenceMismatchError(UserError, ValueError):
    """The stored reference log-probs do not belong to these shards or this reference."""


def _num_records(shard_dir: str) -> int:
    return int(shards.read_manifest(shard_dir)["counts"]["written"])


def _canonical(info: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(info), sort_keys=True, default=str))


def reference_key(fingerprint_info: Mapping[str, Any]) -> str:
    """16 hex digits identifying `fingerprint_info` (the file name's key)."""
    text = json.dumps(_canonical(fingerprint_info), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_file(fingerprint_info: Mapping[str, Any]) -> str:
    """The file name of the log-probs made with `fingerprint_info`."""
    return f"{REFERENCE_PREFIX}-{reference_key(fingerprint_info)}.npz"


def store_dir(shard_dir: str, workdir: str) -> str:
    """Where a run keeps the log-probs of `shard_dir` when that directory is read-only."""
    tag = hashlib.sha256(os.path.abspath(shard_dir).encode()).hexdigest()[:12]
    return os.path.join(
        workdir, "reference_logps", f"{os.path.basename(shard_dir.rstrip('/'))}-{tag}"
    )


def writable(directory: str) -> bool:
    """Whether files can be created in `directory`."""
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def find_reference_logps(
    shard_dir: str, fingerprint_info: Mapping[str, Any], workdir: str = ""
) -> str | None:
    """The path of the log-probs made with `fingerprint_info`: beside the shards, else where the
    run in `workdir` keeps them for these shards (`store_dir`); None when there are none."""
    name = reference_file(fingerprint_info)
    for d in (shard_dir, *([store_dir(shard_dir, workdir)] if workdir else [])):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def write_reference_logps(
    shard_dir: str,
    index: Any,
    chosen: Any,
    rejected: Any,
    fingerprint_info: Mapping[str, Any],
    out_dir: str | None = None,
) -> str:
    """Writes reference log-probs for the records of ``shard_dir``; returns the file path.

    Args:
      shard_dir: a prepared directory.
      index: int[M] record indices (as in the loader's ``index``), unique.
      chosen, rejected: float[M] summed completion log-probs under the reference model.
      fingerprint_info: JSON-able dict identifying the reference (weights hash, tokenizer ...).
      out_dir: where to write (default: ``shard_dir``; made if missing).

    Raises:
      ValueError: shapes differ, indices repeat or fall outside the shards.
    """
    index_M = np.asarray(index, np.int64).reshape(-1)
    chosen_M = np.asarray(chosen, np.float32).reshape(-1)
    rejected_M = np.asarray(rejected, np.float32).reshape(-1)
    if not index_M.size == chosen_M.size == rejected_M.size:
        raise ValueError(
            f"index/chosen/rejected sizes differ: {index_M.size}, {chosen_M.size}, {rejected_M.size}"
        )
    n = _num_records(shard_dir)
    if index_M.size and (index_M.min() < 0 or index_M.max() >= n):
        raise ValueError(f"record index out of range [0, {n})")
    if np.unique(index_M).size != index_M.size:
        raise ValueError("record indices repeat")
    meta = {
        "shard_fingerprint": shards.shard_fingerprint(shard_dir),
        "num_records": n,
        "info": _canonical(fingerprint_info),
    }
    out_dir = out_dir or shard_dir
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, reference_file(fingerprint_info))
    fd, tmp = tempfile.mkstemp(prefix=f".{REFERENCE_PREFIX}-", suffix=".npz", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                index=index_M,
                chosen=chosen_M,
                rejected=rejected_M,
                meta=np.array(json.dumps(meta)),
            )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_reference_logps(
    shard_dir: str, expected_info: Mapping[str, Any], workdir: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Returns dense ``(chosen_R, rejected_R)`` float32 arrays indexed by record index.

    Args:
      shard_dir: the shards the log-probs belong to.
      expected_info: the fingerprint info they must have been made with (it names the file).
      workdir: a run's workdir, which keeps the log-probs of read-only shards (`store_dir`).

    Raises:
      ReferenceMismatchError: no file for ``expected_info``, or the file was made for other
        shards or other fingerprint info, or does not cover every record.
    """
    path = find_reference_logps(shard_dir, expected_info, workdir)
    if path is None:
        raise ReferenceMismatchError(
            f"no reference log-probs for fingerprint info {_canonical(expected_info)} beside "
            f"{shard_dir}: run the reference pass (python -m apo_jax.reference) first"
        )
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        index_M, chosen_M, rejected_M = z["index"], z["chosen"], z["rejected"]
    actual = shards.shard_fingerprint(shard_dir)
    if meta["shard_fingerprint"] != actual:
        raise ReferenceMismatchError(
            f"{path} was computed for shards {meta['shard_fingerprint'][:12]}, these are {actual[:12]}: "
            "recompute reference log-probs after re-preparing the data"
        )
    want = _canonical(expected_info)
    if meta["info"] != want:
        raise ReferenceMismatchError(
            f"{path} fingerprint info {meta['info']} != expected {want}: recompute it"
        )
    n = int(meta["num_records"])
    chosen_R = np.full(n, np.nan, np.float32)
    rejected_R = np.full(n, np.nan, np.float32)
    chosen_R[index_M], rejected_R[index_M] = chosen_M, rejected_M
    missing = np.flatnonzero(np.isnan(chosen_R) | np.isnan(rejected_R))
    if missing.size:
        raise ReferenceMismatchError(
            f"{path} misses {missing.size} of {n} records (first: {missing[:5].tolist()})"
        )
    return chosen_R, rejected_R
