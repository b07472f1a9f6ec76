"""Packed rows: several sequences per row, each attending only to itself.

A 'packed' batch (`apo_jax.data.batch`) holds the 2N sequences of the 'concat' layout (prompt +
chosen of pair i as sequence i, prompt + rejected as sequence N + i) placed end to end in R rows
of T tokens. ``segment_ids`` make attention block-diagonal and causal, ``positions`` restart at 0
in each segment, so every token sees exactly the keys, values and RoPE phases it sees in its
own concat row; the saving is the padding that concat rows carry.

Position t predicts token t + 1 only inside a segment: the last token of a segment and the
first of the next are unrelated, so that prediction is masked out (it never is a completion
token anyway, since every sequence starts with its prompt, but the mask does not rely on it).
Per-token log-probs are summed per sequence with ``jax.ops.segment_sum`` over ``sequence_ids``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from apo_jax.logprobs import token_logps

Array = jax.Array


def _next(x_RxT: Array, fill: int) -> Array:
    """x shifted left by one along T: out[:, t] = x[:, t + 1], the last column `fill`."""
    return jnp.concatenate([x_RxT[:, 1:], jnp.full_like(x_RxT[:, :1], fill)], axis=1)


def packed_targets(batch) -> tuple[Array, Array, Array]:
    """(targets, mask, sequence) of each predicting position of a packed batch, each [R, T].

    ``targets[r, t]`` is the token at t + 1; ``mask`` is 1 where that token is a completion
    token of the same segment; ``sequence`` the global sequence number it counts for (-1 none).
    """
    seg_RxT = batch["segment_ids"]
    same_RxT = (seg_RxT == _next(seg_RxT, 0)) & (seg_RxT > 0)
    mask_RxT = (_next(batch["completion_mask"], 0) > 0) & same_RxT
    seq_RxT = jnp.where(mask_RxT, _next(batch["sequence_ids"], -1), -1)
    return _next(batch["input_ids"], 0), mask_RxT.astype(jnp.float32), seq_RxT


def packed_row_logps(
    graphdef: nnx.GraphDef, params: nnx.State, batch, chunk: int
) -> tuple[Array, Array, Array, Array]:
    """(chosen logps, rejected logps, chosen counts, rejected counts), each [N], of a packed batch.

    Args:
      graphdef, params: the model.
      batch: a packed batch: ``input_ids, positions, segment_ids, completion_mask, sequence_ids``
        ``[R, T]`` and ``index [N]`` (sequence i is pair i's chosen side, N + i its rejected).
      chunk: time steps per chunk of the log-prob head.

    Returns:
      Summed completion log-probs and completion token counts per pair, float32; 0 for a pair
      with no tokens (the loader's padding pairs).
    """
    model = nnx.merge(graphdef, params)
    hidden_RxTxD = model(
        batch["input_ids"],
        positions_BxT=batch["positions"],
        segment_ids_BxT=batch["segment_ids"],
        return_hidden=True,
    )
    targets_RxT, mask_RxT, seq_RxT = packed_targets(batch)
    logps_RxT = token_logps(
        hidden_RxTxD, model.unembedding(), targets_RxT, chunk_size=chunk, where_BxT=mask_RxT > 0
    )
    n = batch["index"].shape[0]
    # Out-of-range ids (-1: prompt, padding, segment ends) are dropped by segment_sum.
    sums_2N = jax.ops.segment_sum((logps_RxT * mask_RxT).ravel(), seq_RxT.ravel(), 2 * n)
    counts_2N = jax.ops.segment_sum(mask_RxT.ravel(), seq_RxT.ravel(), 2 * n)
    return sums_2N[:n], sums_2N[n:], counts_2N[:n], counts_2N[n:]
