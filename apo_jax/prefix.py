"""Prompt-prefix sharing: prompt, chosen and rejected in one row, the prompt computed once.

A 'prefix' batch (`apo_jax.data.batch`) holds one row per pair: ``prompt + chosen + rejected``,
right-padded. ``branch_ids`` (0 prompt, 1 chosen, 2 rejected) give the attention rule of
:func:`apo_jax.data.batch.prefix_attention_mask`: each completion attends to the prompt and to
itself only, and the rejected positions restart at the prompt's end, so every completion token sees
exactly the keys, values and RoPE phases it sees in the 'concat' layout. The prompt's tokens run
once per pair instead of twice, which is the saving when prompts are long.

The one token that needs care is the first rejected token: in the row it follows the last chosen
token, but it is predicted from the prompt's last hidden state. :func:`prefix_row_logps` reads that
state from position ``prompt_length - 1`` in place of the (otherwise unused) last chosen state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from apo_jax.data.batch import prefix_attention_mask
from apo_jax.logprobs import segment_logps

Array = jax.Array
PREFIX_KEYS = ("input_ids", "positions", "segment_ids", "branch_ids", "chosen_mask",
               "rejected_mask", "prompt_length", "chosen_length")  # fmt: skip


def predictor_index(prompt_length_N: Array, chosen_length_N: Array, t: int) -> Array:
    """Index [N, T] of the hidden state each position's successor is predicted from.

    Identity, except that the last chosen position ``p + c - 1`` (whose own prediction would be the
    first rejected token, across the branch boundary) reads the prompt's last state ``p - 1``.
    """
    t_1xT = jnp.arange(t, dtype=jnp.int32)[None, :]
    p_Nx1, c_Nx1 = prompt_length_N[:, None], chosen_length_N[:, None]
    boundary = (t_1xT == p_Nx1 + c_Nx1 - 1) & (p_Nx1 > 0)
    return jnp.where(boundary, p_Nx1 - 1, t_1xT)


def prefix_row_logps(
    graphdef: nnx.GraphDef, params: nnx.State, batch, chunk: int
) -> tuple[Array, Array, Array, Array]:
    """(chosen logps, rejected logps, chosen counts, rejected counts), each [N], of a prefix batch."""
    model = nnx.merge(graphdef, params)
    ids_NxT = batch["input_ids"]
    mask_NxTxT = prefix_attention_mask(batch["branch_ids"], batch["segment_ids"])
    hidden_NxTxD = model(
        ids_NxT, positions_BxT=batch["positions"], attn_mask_BxTxT=mask_NxTxT, return_hidden=True
    )
    src_NxT = predictor_index(batch["prompt_length"], batch["chosen_length"], ids_NxT.shape[1])
    hidden_NxTxD = jnp.take_along_axis(hidden_NxTxD, src_NxT[:, :, None], axis=1)
    masks_2xNxT = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]])
    logps_2xN, counts_2xN = segment_logps(
        hidden_NxTxD, model.unembedding(), ids_NxT, masks_2xNxT, chunk_size=chunk
    )
    return logps_2xN[0], logps_2xN[1], counts_2xN[0], counts_2xN[1]
