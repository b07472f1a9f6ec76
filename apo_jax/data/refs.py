"""Reference log-probs stored beside the shards, keyed by record index and shard fingerprint.

The file ``reference_logps.npz`` holds ``index int64[M]``, ``chosen float32[M]``,
``rejected float32[M]`` and ``meta`` (JSON: the shard fingerprint, the record count and the
caller's fingerprint info, e.g. reference weights and tokenizer hashes). Loading refuses a file
made for other shards, other fingerprint info, or one that misses records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from apo_jax.data import shards
from apo_jax.errors import UserError

REFERENCE_FILE = "reference_logps.npz"


class ReferenceMismatchError(UserError, ValueError):
    """The stored reference log-probs do not belong to these shards or this reference."""


def _num_records(shard_dir: str) -> int:
    return int(shards.read_manifest(shard_dir)["counts"]["written"])


def write_reference_logps(
    shard_dir: str, index: Any, chosen: Any, rejected: Any, fingerprint_info: Mapping[str, Any]
) -> str:
    """Writes reference log-probs for the records of ``shard_dir``; returns the file path.

    Args:
      shard_dir: a prepared directory.
      index: int[M] record indices (as in the loader's ``index``), unique.
      chosen, rejected: float[M] summed completion log-probs under the reference model.
      fingerprint_info: JSON-able dict identifying the reference (weights hash, tokenizer ...).

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
        "info": json.loads(json.dumps(dict(fingerprint_info), sort_keys=True)),
    }
    path = os.path.join(shard_dir, REFERENCE_FILE)
    tmp = path + ".tmp.npz"
    np.savez(
        tmp, index=index_M, chosen=chosen_M, rejected=rejected_M, meta=np.array(json.dumps(meta))
    )
    os.replace(tmp, path)
    return path


def has_reference_logps(shard_dir: str) -> bool:
    """True when a reference log-prob file sits beside the shards."""
    return os.path.exists(os.path.join(shard_dir, REFERENCE_FILE))


def load_reference_logps(
    shard_dir: str, expected_info: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns dense ``(chosen_R, rejected_R)`` float32 arrays indexed by record index.

    Raises:
      ReferenceMismatchError: the file was made for other shards, for other fingerprint info
        than ``expected_info``, or does not cover every record.
    """
    path = os.path.join(shard_dir, REFERENCE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: run the reference pass (apo_jax.reference) first"
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
    if expected_info is not None:
        want = json.loads(json.dumps(dict(expected_info), sort_keys=True))
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
