"""The 'concat' layout: one sequence per row, chosen rows then rejected rows.

Rows ``0..N-1`` hold prompt + chosen of pairs ``0..N-1``, rows ``N..2N-1`` prompt + rejected, each
right-padded to ``T`` (the smallest bucket that fits the longest row, else ``seq_len``):

  ``input_ids, completion_mask, positions, segment_ids: int32[2N, T]``

``completion_mask`` is 1 on completion tokens (in ``input_ids`` coordinates), ``segment_ids`` 1 on
real tokens and 0 on padding, ``positions`` count from 0. Chosen and rejected run in one forward,
so the weights stream once per step. Every row holds one sequence from position 0, right-padded,
so plain causal attention is exact at every real token and no mask is built.

Globally the layout is kept: rows ``0..NP-1`` are the chosen rows of all P processes, then the
rejected ones. A micro-batch takes pairs ``i * N/k .. (i + 1) * N/k - 1``: its chosen rows, then
their rejected rows. Every micro-batch's ``2N/k`` rows must split over the mesh's batch axes.
This is also the layout of the reference pass (:mod:`apo_jax.reference`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax import logprobs
from apo_jax.layouts import base
from apo_jax.logprobs import sequence_logps


@dataclasses.dataclass(frozen=True)
class Concat(base.Layout):
    """Chosen rows, then rejected rows (see the module docstring)."""

    name = "concat"
    rows_per_pair = 2

    def collate(
        self, records: Sequence[base.Record | None], spec: base.RowSpec
    ) -> dict[str, np.ndarray]:
        """2N rows: prompt + chosen of each pair, then prompt + rejected."""
        sides = [(r.prompt, r.chosen) if r else None for r in records] + [
            (r.prompt, r.rejected) if r else None for r in records
        ]
        return sequence_rows(sides, spec)

    def global_batch(
        self, batch: base.Batch, sharding: Any, *, micro_batches: int = 1, same_shape: bool = False
    ) -> dict[str, Any]:
        """Global arrays ``[2NP, T]`` (chosen rows of all processes, then rejected) and ``[NP]``.

        See :meth:`apo_jax.layouts.base.Layout.global_batch` for the arguments.
        """
        del micro_batches  # a micro-batch is a slice of the global pairs
        if not same_shape:
            batch = base.agree_shape(batch)
        n = len(batch["index"])
        halves = {key: 2 for key, x in batch.items() if x.ndim == 2 and x.shape[0] == 2 * n}
        return base.to_global(batch, sharding, halves)

    def pair_logps(
        self, graphdef: Any, params: Any, batch: base.Batch, chunk: int
    ) -> base.SideLogps:
        """Log-probs and token counts of the N pairs: rows ``:N`` chosen, ``N:`` rejected."""
        logps_R, counts_R = row_logps(graphdef, params, batch, chunk)
        n = logps_R.shape[0] // 2
        return base.SideLogps(logps_R[:n], logps_R[n:], counts_R[:n], counts_R[n:])

    def regularized_logps(
        self,
        graphdef: Any,
        params: Any,
        batch: base.Batch,
        chunk: int,
        *,
        ld_alpha: float = 1.0,
        wpo: bool = False,
    ) -> tuple[base.SideLogps, Any, Any]:
        """:meth:`pair_logps` with TRL's DPO options, from one forward pass.

        See :meth:`apo_jax.layouts.base.Layout.regularized_logps`; without the options this is
        :meth:`pair_logps`.
        """
        if ld_alpha == 1.0 and not wpo:
            return self.pair_logps(graphdef, params, batch, chunk), None, None
        model = nnx.merge(graphdef, params)
        hidden_BxTxD = model(
            batch["input_ids"],
            positions_BxT=batch["positions"],
            segment_ids_BxT=None,
            attn_mask_BxTxT=None,
            return_hidden=True,
        )
        mask_BxT = batch["completion_mask"]
        n = mask_BxT.shape[0] // 2
        ld_w, ld_l = logprobs.ld_mask(mask_BxT[:n], mask_BxT[n:], ld_alpha)
        masks_KxBxT = jnp.stack([jnp.concatenate([ld_w, ld_l]), mask_BxT.astype(jnp.float32)])
        sums_KxB, counts_KxB = logprobs.segment_logps(
            hidden_BxTxD, model.unembedding(), batch["input_ids"], masks_KxBxT, chunk_size=chunk
        )
        logps_B, counts_B = sums_KxB[0], counts_KxB[1]
        side = base.SideLogps(logps_B[:n], logps_B[n:], counts_B[:n], counts_B[n:])
        if not wpo:
            return side, None, None
        w_B = logprobs.wpo_weights(
            hidden_BxTxD, model.unembedding(), batch["input_ids"], mask_BxT, chunk_size=chunk
        )
        return side, w_B[:n], w_B[n:]

    def micro_batches(self, batch: base.Batch, k: int) -> dict[str, Any]:
        """k micro-batches of N/k pairs, stacked on axis 0, each chosen rows then rejected rows."""
        n = batch["index"].shape[0]
        if n % k:
            raise ValueError(f"{n} pairs per step do not split into {k} micro-batches")
        out = {}
        for key, x in batch.items():
            if x.shape[0] == 2 * n:  # rows: chosen block then rejected block
                halves = x.reshape(2, k, n // k, *x.shape[1:])
                out[key] = jnp.concatenate([halves[0], halves[1]], axis=1)
            else:  # one value per pair
                out[key] = x.reshape(k, n // k, *x.shape[1:])
        return out


def sequence_rows(
    sides: Sequence[tuple[np.ndarray, np.ndarray] | None], spec: base.RowSpec
) -> dict[str, np.ndarray]:
    """One right-padded row per (prompt, completion) (None: a padding row), as concat lays them."""
    rows = len(sides)
    needed = max([len(p) + len(c) for p, c in filter(None, sides)], default=1)
    t = base.pick_length(needed, spec.seq_len, spec.buckets)
    ids = np.full((rows, t), spec.pad_id, np.int32)
    completion = np.zeros((rows, t), np.int32)
    positions = np.zeros((rows, t), np.int32)
    segments = np.zeros((rows, t), np.int32)
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


def row_logps(graphdef: Any, params: Any, batch: base.Batch, chunk: int) -> tuple[Any, Any]:
    """Summed completion log-probs and completion token counts of every row, each ``[2N]``.

    Args:
      graphdef, params: the model (``nnx.split``).
      batch: a concat batch (``input_ids, positions, completion_mask [2N, T]``).
      chunk: time steps per chunk of the log-prob head.
    """
    model = nnx.merge(graphdef, params)
    hidden_BxTxD = model(
        batch["input_ids"],
        positions_BxT=batch["positions"],
        segment_ids_BxT=None,
        attn_mask_BxTxT=None,
        return_hidden=True,
    )
    return sequence_logps(
        hidden_BxTxD,
        model.unembedding(),
        batch["input_ids"],
        batch["completion_mask"],
        chunk_size=chunk,
    )
