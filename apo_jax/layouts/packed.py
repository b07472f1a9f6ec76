"""The 'packed' layout: several sequences per row, each attending only to itself.

The 2N sequences of the 'concat' layout (prompt + chosen of pair i as sequence i, prompt +
rejected as sequence N + i) are placed longest first, each into the first row with room
(first-fit decreasing, ties by sequence number, so a batch always packs the same way), in R rows
of T tokens (T chosen as in concat, from the longest sequence):

  ``input_ids, completion_mask, positions, segment_ids, sequence_ids: int32[R, T]``

A sequence is one contiguous segment of one row. ``segment_ids`` number the segments 1..k within
a row (0 = padding), so attention is block-diagonal and causal; ``positions`` restart at 0 in
each segment, so every token sees exactly the keys, values and RoPE phases of its concat row;
``sequence_ids`` give each token's sequence (-1 on padding). The saving is the padding that
concat rows carry. Position t predicts token t + 1 only inside a segment (:func:`targets`), and
per-token log-probs are summed per sequence with ``jax.ops.segment_sum`` over ``sequence_ids``.

Gradient accumulation: with k micro-batches, the pairs ``i * N/k .. (i + 1) * N/k - 1`` of
micro-batch i are packed apart (their sequences numbered within the micro-batch), every
micro-batch gets the same row count, and the micro-batches' rows follow each other, so the split
is a reshape and no pair straddles two micro-batches. The row count per micro-batch is the
number of rows used, rounded up to a multiple of ``step = ceil(2N/k / 8)`` (itself rounded up to
``row_multiple``), at most ``2N/k`` rounded up to ``row_multiple`` (:func:`row_count`): at most
eight row counts per T, so the step compiles a handful of times.

Globally, micro-batch i is the union of every process's micro-batch i: the processes' rows are
padded to the largest row count and T of any process (one small all-gather per batch), then
placed micro-batch by micro-batch, and ``sequence_ids`` are renumbered to the global pairs of
the micro-batch (:func:`global_sequence_ids`). ``row_multiple`` is set so that the rows of all
processes split evenly over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax.layouts import base
from apo_jax.logprobs import token_logps

ROW_STEPS = 8  # row counts: multiples of ceil(2N / 8), so at most 8 shapes per T
_ROW_KEYS = ("completion_mask", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class Packed(base.Layout):
    """Sequences packed several to a row (see the module docstring)."""

    name = "packed"

    def collate(
        self, records: Sequence[base.Record | None], spec: base.RowSpec
    ) -> dict[str, np.ndarray]:
        """The pairs of each of ``spec.micro_batches`` micro-batches packed into R rows each."""
        k = spec.micro_batches
        m = len(records) // k
        seqs = [_sequences(micro) for micro in base.split_records(records, k)]
        longest = max([len(p) + len(c) for micro in seqs for p, c in filter(None, micro)] + [1])
        t = base.pick_length(longest, spec.seq_len, spec.buckets)
        placed = [_place(micro, t) for micro in seqs]
        rows = max(row_count(len(p), 2 * m, spec.row_multiple) for p in placed)
        out = {key: np.zeros((k * rows, t), np.int32) for key in _ROW_KEYS}
        out["input_ids"] = np.full((k * rows, t), spec.pad_id, np.int32)
        out["sequence_ids"] = np.full((k * rows, t), -1, np.int32)
        for i, (micro, micro_placed) in enumerate(zip(seqs, placed, strict=True)):
            _write(out, i * rows, micro, micro_placed)
        return out

    def shapes_always_agree(self, buckets: Sequence[int] | None) -> bool:
        """Never: the row count depends on the pairs."""
        return False

    def global_batch(
        self, batch: base.Batch, sharding: Any, *, micro_batches: int = 1, same_shape: bool = False
    ) -> dict[str, Any]:
        """Global arrays: micro-batch by micro-batch, the rows (and pairs) of every process.

        See :meth:`apo_jax.layouts.base.Layout.global_batch` for the arguments. ``sequence_ids``
        are renumbered to the global pairs of their micro-batch.
        """
        k = micro_batches
        if not same_shape:
            batch = base.agree_shape(batch, blocks=k)
        m, procs = len(batch["index"]) // k, jax.process_count()
        # Where make_array_from_process_local_data puts this process's pairs in a micro-batch.
        axis = sharding.spec[0] if len(sharding.spec) else None
        pair_sh = jax.sharding.NamedSharding(
            base.auto_mesh(sharding), jax.sharding.PartitionSpec(None, axis)
        )
        index_map = pair_sh.addressable_devices_indices_map((k, m * procs))
        offset = min(idx[1].start or 0 for idx in index_map.values())
        ids = global_sequence_ids(batch["sequence_ids"], m, m * procs, offset)
        return base.to_global({**batch, "sequence_ids": ids}, sharding, dict.fromkeys(batch, k))

    def pair_logps(
        self, graphdef: Any, params: Any, batch: base.Batch, chunk: int
    ) -> base.SideLogps:
        """Log-probs and token counts of the N pairs, summed over their sequences' tokens.

        A pair with no tokens (the loader's padding pairs) gets 0.
        """
        model = nnx.merge(graphdef, params)
        hidden_RxTxD = model(
            batch["input_ids"],
            positions_BxT=batch["positions"],
            segment_ids_BxT=batch["segment_ids"],
            return_hidden=True,
        )
        targets_RxT, mask_RxT, seq_RxT = targets(batch)
        logps_RxT = token_logps(
            hidden_RxTxD, model.unembedding(), targets_RxT, chunk_size=chunk, where_BxT=mask_RxT > 0
        )
        n = batch["index"].shape[0]
        # Out-of-range ids (-1: prompt, padding, segment ends) are dropped by segment_sum.
        sums_2N = jax.ops.segment_sum((logps_RxT * mask_RxT).ravel(), seq_RxT.ravel(), 2 * n)
        counts_2N = jax.ops.segment_sum(mask_RxT.ravel(), seq_RxT.ravel(), 2 * n)
        return base.SideLogps(sums_2N[:n], sums_2N[n:], counts_2N[:n], counts_2N[n:])

    def check(
        self, *, batch_size: int, grad_accum: int, data_ways: int, process_count: int
    ) -> None:
        """Also: each process's pairs split into ``grad_accum`` micro-batches, packed apart."""
        super().check(
            batch_size=batch_size,
            grad_accum=grad_accum,
            data_ways=data_ways,
            process_count=process_count,
        )
        local = batch_size // process_count
        if local % grad_accum:
            raise base.LayoutError(
                f"config.data.layout=packed packs each process's micro-batches apart, but its "
                f"{local} pairs (config.batch_size {batch_size} / {process_count} processes) do "
                f"not split into config.grad_accum = {grad_accum}: make config.batch_size a "
                f"multiple of {process_count * grad_accum}"
            )


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


def row_count(used: int, n_sequences: int, row_multiple: int = 1) -> int:
    """Rows of a packed (micro-)batch: `used` rounded up to a multiple of the step, at most the cap.

    step = ceil(n_sequences / 8) rounded up to a multiple of ``row_multiple``; cap =
    ``n_sequences`` rounded up to a multiple of ``row_multiple`` (one sequence per row). So a
    batch size gives at most 8 row counts per row length (fewer compiles), each a multiple of
    ``row_multiple`` (rows shard evenly), and never fewer than one step.
    """
    step = _ceil_to(-(-n_sequences // ROW_STEPS), row_multiple)
    return min(max(step, _ceil_to(used, step)), _ceil_to(n_sequences, row_multiple))


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


Side = tuple[np.ndarray, np.ndarray] | None  # (prompt, completion); None for a padding pair


def _sequences(records: Sequence[base.Record | None]) -> list[Side]:
    # Sequence i: prompt + chosen of pair i; sequence m + i: prompt + rejected.
    return [(r.prompt, r.chosen) if r else None for r in records] + [
        (r.prompt, r.rejected) if r else None for r in records
    ]


def _place(seqs: list[Side], t: int) -> list[list[int]]:
    """The sequence numbers each row holds (padding pairs hold none)."""
    real = [s for s, side in enumerate(seqs) if side and len(side[0]) + len(side[1])]
    return [[real[j] for j in row] for row in pack_rows([sum(map(len, seqs[s])) for s in real], t)]


def _write(out: dict[str, np.ndarray], first_row: int, seqs: list[Side], placed: list[list[int]]):
    """Writes the rows of one micro-batch from row `first_row` on."""
    for row, members in enumerate(placed, start=first_row):
        start = 0
        for segment, s in enumerate(members, start=1):
            p, c = seqs[s]
            end = start + len(p) + len(c)
            out["input_ids"][row, start : start + len(p)] = p
            out["input_ids"][row, start + len(p) : end] = c
            out["completion_mask"][row, start + len(p) : end] = 1
            out["positions"][row, start:end] = np.arange(end - start)
            out["segment_ids"][row, start:end] = segment
            out["sequence_ids"][row, start:end] = s
            start = end


def _next(x_RxT: jax.Array, fill: int) -> jax.Array:
    """x shifted left by one along T: out[:, t] = x[:, t + 1], the last column `fill`."""
    return jnp.concatenate([x_RxT[:, 1:], jnp.full_like(x_RxT[:, :1], fill)], axis=1)


def targets(batch: base.Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(targets, mask, sequence) of each predicting position of a packed batch, each [R, T].

    ``targets[r, t]`` is the token at t + 1; ``mask`` is 1 where that token is a completion
    token of the same segment; ``sequence`` the sequence number it counts for (-1 none).
    """
    seg_RxT = batch["segment_ids"]
    same_RxT = (seg_RxT == _next(seg_RxT, 0)) & (seg_RxT > 0)
    mask_RxT = (_next(batch["completion_mask"], 0) > 0) & same_RxT
    seq_RxT = jnp.where(mask_RxT, _next(batch["sequence_ids"], -1), -1)
    return _next(batch["input_ids"], 0), mask_RxT.astype(jnp.float32), seq_RxT


def global_sequence_ids(sequence_ids: np.ndarray, n: int, n_global: int, offset: int) -> np.ndarray:
    """Local sequence numbers (i chosen, n + i rejected of local pair i) -> global ones.

    The process's n pairs (of a micro-batch) are global pairs ``offset .. offset + n - 1`` of
    ``n_global``; padding (-1) stays -1.
    """
    chosen = sequence_ids + offset
    rejected = sequence_ids - n + n_global + offset
    return np.where(sequence_ids < 0, -1, np.where(sequence_ids < n, chosen, rejected)).astype(
        sequence_ids.dtype
    )
