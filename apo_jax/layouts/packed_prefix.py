"""The 'packed_prefix' layout: prefix rows (prompt once, both completions) packed several to a row.

Each pair is one unit ``prompt + chosen + rejected`` as in the 'prefix' layout, and the units are
packed into R rows of T tokens as the 'packed' layout packs sequences (first-fit decreasing,
micro-batches packed apart, the same row counts and global-batch rules):

  ``input_ids, completion_mask, positions, segment_ids, sequence_ids, branch_ids,
  predictor: int32[R, T]``

``segment_ids`` number the units of a row 1..k; ``branch_ids`` are 0 on a prompt, 1 on chosen, 2
on rejected; attention is causal, within a unit, and a completion sees its prompt and itself
only (:func:`apo_jax.layouts.prefix.attention_mask`); positions restart at 0 in each unit and the
rejected positions restart at the prompt's end. So every completion token sees exactly the keys,
values and RoPE phases of its concat row, while each prompt runs once per pair (as in 'prefix')
and short pairs share rows (as in 'packed'): the least work of the four layouts when prompts are
a large share of the tokens and rows vary in length.

``sequence_ids`` are i on the prompt and chosen tokens of local pair i and N + i on its rejected
tokens (-1 on padding), as the 'packed' layout numbers the sequences, so its targets, per-sequence
sums and global renumbering apply unchanged. The one hidden state that differs: the last chosen
position predicts the first rejected token, which is predicted from the prompt's last state;
``predictor`` gives for every position the row index of the hidden state that predicts its next
token (itself, except there).

``T`` defaults to the shards' longest prefix row rounded up to 64 (:meth:`Prefix.default_seq_len`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax.layouts import base, packed, prefix
from apo_jax.logprobs import token_logps

_ROW_KEYS = ("completion_mask", "positions", "segment_ids", "branch_ids")


@dataclasses.dataclass(frozen=True)
class PackedPrefix(packed.Packed):
    """Prefix units packed several to a row (see the module docstring)."""

    name = "packed_prefix"
    length_key = "prefix_row"

    def collate(
        self, records: Sequence[base.Record | None], spec: base.RowSpec
    ) -> dict[str, np.ndarray]:
        """The pairs of each of ``spec.micro_batches`` micro-batches packed into R rows each."""
        k = spec.micro_batches
        micros = base.split_records(records, k)
        m = len(micros[0])
        longest = max([_unit_length(r) for r in records if r] + [1])
        t = base.pick_length(longest, spec.seq_len, spec.buckets)
        placed = [_place(micro, t) for micro in micros]
        rows = max(packed.row_count(len(p), m, spec.row_multiple) for p in placed)
        out = {key: np.zeros((k * rows, t), np.int32) for key in _ROW_KEYS}
        out["input_ids"] = np.full((k * rows, t), spec.pad_id, np.int32)
        out["sequence_ids"] = np.full((k * rows, t), -1, np.int32)
        out["predictor"] = np.broadcast_to(np.arange(t, dtype=np.int32), (k * rows, t)).copy()
        for i, (micro, micro_placed) in enumerate(zip(micros, placed, strict=True)):
            _write(out, i * rows, micro, micro_placed)
        return out

    def default_seq_len(self, manifest: Mapping[str, Any]) -> int:
        """The shards' longest prefix row (else twice ``max_length``), rounded up to 64."""
        return prefix.Prefix().default_seq_len(manifest)

    def pair_logps(
        self, graphdef: Any, params: Any, batch: base.Batch, chunk: int
    ) -> base.SideLogps:
        """Log-probs and token counts of the N pairs, summed over their tokens in the rows."""
        model = nnx.merge(graphdef, params)
        mask_RxTxT = prefix.attention_mask(batch["branch_ids"], batch["segment_ids"])
        hidden_RxTxD = model(
            batch["input_ids"],
            positions_BxT=batch["positions"],
            attn_mask_BxTxT=mask_RxTxT,
            return_hidden=True,
        )
        hidden_RxTxD = jnp.take_along_axis(hidden_RxTxD, batch["predictor"][:, :, None], axis=1)
        targets_RxT, mask_RxT, seq_RxT = packed.targets(batch)
        logps_RxT = token_logps(
            hidden_RxTxD, model.unembedding(), targets_RxT, chunk_size=chunk, where_BxT=mask_RxT > 0
        )
        n = batch["index"].shape[0]
        sums_2N = jax.ops.segment_sum((logps_RxT * mask_RxT).ravel(), seq_RxT.ravel(), 2 * n)
        counts_2N = jax.ops.segment_sum(mask_RxT.ravel(), seq_RxT.ravel(), 2 * n)
        return base.SideLogps(sums_2N[:n], sums_2N[n:], counts_2N[:n], counts_2N[n:])


def _unit_length(r: base.Record) -> int:
    return len(r.prompt) + len(r.chosen) + len(r.rejected)


def _place(records: Sequence[base.Record | None], t: int) -> list[list[int]]:
    """The pair numbers each row holds (padding pairs hold none)."""
    real = [i for i, r in enumerate(records) if r is not None and _unit_length(r)]
    lengths = [_unit_length(records[i]) for i in real]
    return [[real[j] for j in row] for row in packed.pack_rows(lengths, t)]


def _write(out: dict[str, np.ndarray], first_row: int, records, placed: list[list[int]]) -> None:
    """Writes the rows of one micro-batch (of m pairs) from row `first_row` on."""
    m = len(records)
    for row, members in enumerate(placed, start=first_row):
        start = 0
        for segment, i in enumerate(members, start=1):
            r = records[i]
            p, c, j = len(r.prompt), len(r.chosen), len(r.rejected)
            a, b, end = start + p, start + p + c, start + p + c + j
            out["input_ids"][row, start:end] = np.concatenate([r.prompt, r.chosen, r.rejected])
            out["completion_mask"][row, a:end] = 1
            out["positions"][row, start:b] = np.arange(p + c)
            out["positions"][row, b:end] = np.arange(p, p + j)
            out["segment_ids"][row, start:end] = segment
            out["branch_ids"][row, a:b], out["branch_ids"][row, b:end] = 1, 2
            out["sequence_ids"][row, start:b], out["sequence_ids"][row, b:end] = i, m + i
            if p:  # the last chosen state's successor is predicted from the prompt's last state
                out["predictor"][row, b - 1] = a - 1
            elif j:  # no prompt: as in concat, a completion's first token has no predictor
                out["completion_mask"][row, b] = 0
            start = end
