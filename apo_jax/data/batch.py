"""Turning tokenized pairs into fixed-shape batches: the "concat", "prefix" and "packed" layouts.

concat (docs/architecture.md): rows 0..N-1 are prompt+chosen, rows N..2N-1 prompt+rejected,
right-padded to T. prefix: one row per pair, prompt + chosen + rejected, with positions of the
rejected part restarting at the prompt end and ``branch_ids`` (0 prompt, 1 chosen, 2 rejected) so
that each completion attends to the prompt and to itself only (:func:`prefix_attention_mask`).
packed: the 2N sequences of concat placed first-fit-decreasing into as few rows of T as fit,
``sequence_ids`` naming each token's sequence (:func:`pack_rows`, :func:`packed_row_count`).

A padding pair (used when ``drop_remainder=False`` fills the last batch) has ``index == -1`` and
all-zero masks and segment ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apo_jax.data import shards

LAYOUTS = ("concat", "prefix", "packed")
PACKED_ROW_STEPS = 8  # packed row counts: multiples of ceil(2N / 8), so at most 8 shapes per T


def pick_length(needed: int, seq_len: int, buckets: Sequence[int] | None) -> int:
    """Returns the smallest bucket >= needed (or seq_len without buckets); raises when none fits."""
    for t in sorted(buckets or ()) + [seq_len]:
        if needed <= t:
            return t
    raise ValueError(
        f"a row of {needed} tokens does not fit seq_len {seq_len}; raise seq_len or re-prepare "
        "with a smaller max_length"
    )


@dataclasses.dataclass
class Collate:
    """grain ``batch_fn``: a list of ``(record_index, record_bytes)`` -> dict of numpy arrays.

    Picklable (plain fields), so grain worker processes can run it.
    """

    layout: str
    seq_len: int
    pad_id: int
    buckets: tuple[int, ...] | None = None
    ref_chosen_R: np.ndarray | None = None
    ref_rejected_R: np.ndarray | None = None
    row_multiple: int = 1  # packed: the row count is a multiple of this (the mesh's batch shards)

    def __call__(self, items: Sequence[tuple[int, bytes]]) -> dict[str, np.ndarray]:
        """Decodes the records and lays them out as one batch."""
        recs = [shards.deserialize(b) if b else None for _, b in items]
        index_N = np.array(
            [i if r is not None else -1 for (i, _), r in zip(items, recs, strict=True)], np.int64
        )
        if self.layout == "packed":
            batch = _packed(recs, self.seq_len, self.buckets, self.pad_id, self.row_multiple)
        else:
            fn = _concat if self.layout == "concat" else _prefix
            batch = fn(recs, self.seq_len, self.buckets, self.pad_id)
        batch["index"] = index_N
        if self.ref_chosen_R is not None:
            real = index_N >= 0
            for key, ref_R in (
                ("ref_chosen_logps", self.ref_chosen_R),
                ("ref_rejected_logps", self.ref_rejected_R),
            ):
                batch[key] = np.where(real, ref_R[np.maximum(index_N, 0)], 0.0).astype(np.float32)
        return batch


def _concat(
    recs: list[shards.PairRecord | None], seq_len: int, buckets: Any, pad_id: int
) -> dict[str, np.ndarray]:
    n = len(recs)
    sides = [(r.prompt, r.chosen) if r else None for r in recs] + [
        (r.prompt, r.rejected) if r else None for r in recs
    ]
    needed = max([len(p) + len(c) for p, c in filter(None, sides)], default=1)
    t = pick_length(needed, seq_len, buckets)
    ids = np.full((2 * n, t), pad_id, np.int32)
    completion = np.zeros((2 * n, t), np.int32)
    positions = np.zeros((2 * n, t), np.int32)
    segments = np.zeros((2 * n, t), np.int32)
    for row, side in enumerate(sides):
        if side is None:
            continue
        p, c = side
        L = len(p) + len(c)
        ids[row, : len(p)], ids[row, len(p) : L] = p, c
        completion[row, len(p) : L] = 1
        positions[row, :L] = np.arange(L)
        segments[row, :L] = 1
    return {
        "input_ids": ids,
        "completion_mask": completion,
        "positions": positions,
        "segment_ids": segments,
    }


def _prefix(
    recs: list[shards.PairRecord | None], seq_len: int, buckets: Any, pad_id: int
) -> dict[str, np.ndarray]:
    n = len(recs)
    needed = max([len(r.prompt) + len(r.chosen) + len(r.rejected) for r in recs if r], default=1)
    t = pick_length(needed, seq_len, buckets)
    out = {
        k: np.zeros((n, t), np.int32)
        for k in ("chosen_mask", "rejected_mask", "positions", "segment_ids", "branch_ids")
    }
    out["input_ids"] = np.full((n, t), pad_id, np.int32)
    out["prompt_length"] = np.zeros(n, np.int32)
    out["chosen_length"] = np.zeros(n, np.int32)
    for row, r in enumerate(recs):
        if r is None:
            continue
        p, c, j = len(r.prompt), len(r.chosen), len(r.rejected)
        L = p + c + j
        out["input_ids"][row, :L] = np.concatenate([r.prompt, r.chosen, r.rejected])
        out["chosen_mask"][row, p : p + c] = 1
        out["rejected_mask"][row, p + c : L] = 1
        out["branch_ids"][row, p : p + c], out["branch_ids"][row, p + c : L] = 1, 2
        out["positions"][row, : p + c] = np.arange(p + c)
        out["positions"][row, p + c : L] = np.arange(p, p + j)
        out["segment_ids"][row, :L] = 1
        out["prompt_length"][row], out["chosen_length"][row] = p, c
    return out


def pack_rows(lengths: Sequence[int], t: int) -> list[list[int]]:
    """First-fit-decreasing: the sequence numbers each row holds, in their order in the row.

    Longest first (ties by sequence number), each into the first row with room, else a new row;
    deterministic. Every length must be <= t.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda s: (-lengths[s], s)):
        r = next((r for r, f in enumerate(free) if lengths[s] <= f), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(t)
        rows[r].append(s)
        free[r] -= lengths[s]
    return rows


def packed_row_count(used: int, n_sequences: int, row_multiple: int = 1) -> int:
    """Rows of a packed batch: `used` rounded up to a multiple of the step, at most the cap.

    step = ceil(n_sequences / 8) rounded up to a multiple of ``row_multiple``; cap =
    ``n_sequences`` rounded up to a multiple of ``row_multiple`` (one sequence per row). So a
    batch size gives at most 8 row counts per row length (fewer compiles), each a multiple of
    ``row_multiple`` (rows shard evenly), and never fewer than one step.
    """
    step = _ceil_to(-(-n_sequences // PACKED_ROW_STEPS), row_multiple)
    return min(max(step, _ceil_to(used, step)), _ceil_to(n_sequences, row_multiple))


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _packed(
    recs: list[shards.PairRecord | None],
    seq_len: int,
    buckets: Any,
    pad_id: int,
    row_multiple: int,
) -> dict[str, np.ndarray]:
    n = len(recs)
    seqs = [(r.prompt, r.chosen) if r else None for r in recs] + [
        (r.prompt, r.rejected) if r else None for r in recs
    ]
    lengths = [len(side[0]) + len(side[1]) if side else 0 for side in seqs]
    t = pick_length(max(lengths + [1]), seq_len, buckets)
    real = [s for s in range(2 * n) if lengths[s]]
    placed = pack_rows([lengths[s] for s in real], t)
    rows = packed_row_count(len(placed), 2 * n, row_multiple)
    out = {k: np.zeros((rows, t), np.int32)
           for k in ("completion_mask", "positions", "segment_ids")}  # fmt: skip
    out["input_ids"] = np.full((rows, t), pad_id, np.int32)
    out["sequence_ids"] = np.full((rows, t), -1, np.int32)
    for row, members in enumerate(placed):
        start = 0
        for segment, k in enumerate(members, start=1):
            s = real[k]
            p, c = seqs[s]
            end = start + lengths[s]
            out["input_ids"][row, start : start + len(p)] = p
            out["input_ids"][row, start + len(p) : end] = c
            out["completion_mask"][row, start + len(p) : end] = 1
            out["positions"][row, start:end] = np.arange(lengths[s])
            out["segment_ids"][row, start:end] = segment
            out["sequence_ids"][row, start:end] = s
            start = end
    return out


def pad_batch(
    batch: Mapping[str, np.ndarray], rows: int, t: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """A batch of any layout grown to ``rows`` rows of ``t`` tokens, with the collate's padding.

    Every field of two or more dims is ``[rows, T, ...]`` with each later dim ``T`` (an ``[N, T,
    T]`` attention mask too): the first dim grows to ``rows``, the others to ``t``. The new
    entries are padding as the layouts write it: ``input_ids`` ``pad_id``, ``sequence_ids`` -1,
    and 0 (False) elsewhere -- segment 0, no completion or branch, position 0, no attention -- so
    no loss changes. Per-pair fields (``[N]``) are kept.
    """
    out = dict(batch)
    for key, x in batch.items():
        if x.ndim >= 2:
            widths = [(0, rows - x.shape[0])] + [(0, t - d) for d in x.shape[1:]]
            fill = {"input_ids": pad_id, "sequence_ids": -1}.get(key, 0)
            out[key] = np.pad(x, widths, constant_values=fill)
    return out


def prefix_attention_mask(branch_ids_NxT: Any, segment_ids_NxT: Any) -> Any:
    """Returns the bool ``[N, T, T]`` mask (True = query may attend key) for the prefix layout.

    mask[q, k] = k <= q  and  segment[q] == segment[k]  and  (branch[k] == 0 or branch[k] == branch[q]):
    the prompt is seen by both completions, a completion never sees the other one, and padding
    (segment 0) only sees padding. Works on numpy and on jax arrays.
    """
    import jax.numpy as jnp

    xp = np if isinstance(branch_ids_NxT, np.ndarray) else jnp
    t = branch_ids_NxT.shape[-1]
    causal_TxT = xp.tril(xp.ones((t, t), dtype=bool))
    bq, bk = branch_ids_NxT[:, :, None], branch_ids_NxT[:, None, :]
    same_segment = segment_ids_NxT[:, :, None] == segment_ids_NxT[:, None, :]
    return causal_TxT[None] & same_segment & ((bk == 0) | (bk == bq))
