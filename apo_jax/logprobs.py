"""Per-sequence log-probabilities of completions, from hidden states, in bounded memory.

The last step of a causal LM maps each hidden state to V logits. With Llama-3's 128,256-token
vocabulary, float32 logits for 16 sequences of 4,096 tokens take 34 GB, and their log-softmax and
backward more. Here the projection, log-softmax and target gather run over chunks of the time
axis under ``jax.checkpoint``: the forward keeps only the per-token results of a chunk and the
backward recomputes each chunk's logits, so memory grows with the chunk, not with T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def shift_targets(input_ids_BxT: Array, completion_mask_BxT: Array) -> tuple[Array, Array]:
    """Targets and mask for next-token prediction: position t predicts token t + 1."""
    zeros_Bx1 = jnp.zeros_like(input_ids_BxT[:, :1])
    targets_BxT = jnp.concatenate([input_ids_BxT[:, 1:], zeros_Bx1], axis=1)
    mask_BxT = jnp.concatenate(
        [completion_mask_BxT[:, 1:], jnp.zeros_like(completion_mask_BxT[:, :1])], axis=1
    )
    return targets_BxT, mask_BxT.astype(jnp.float32)


@jax.custom_vjp
def _chunk_logits(hidden_BxCxD: Array, unembed_DxV: Array) -> Array:
    """float32 logits h W, the matmul in the hidden states' dtype (W cast to it).

    Its backward casts the float32 logit gradient to that dtype too, so both backward matmuls run
    in it (bfloat16 on an accelerator: on an H100 they otherwise ran as TF32 GEMMs, a sixth of
    the step) and accumulate in float32; the unembedding gradient comes back in W's own dtype. In
    float32 nothing changes.
    """
    return jnp.einsum(
        "bcd,dv->bcv",
        hidden_BxCxD,
        unembed_DxV.astype(hidden_BxCxD.dtype),
        preferred_element_type=jnp.float32,
    )


def _chunk_logits_fwd(hidden_BxCxD, unembed_DxV):
    return _chunk_logits(hidden_BxCxD, unembed_DxV), (hidden_BxCxD, unembed_DxV)


def _chunk_logits_bwd(res, g_BxCxV):
    hidden_BxCxD, unembed_DxV = res
    dt = hidden_BxCxD.dtype
    g_BxCxV = g_BxCxV.astype(dt)
    w_DxV = unembed_DxV.astype(dt)
    f32 = jnp.float32
    d_hidden = jnp.einsum("bcv,dv->bcd", g_BxCxV, w_DxV, preferred_element_type=f32).astype(dt)
    d_unembed = jnp.einsum("bcd,bcv->dv", hidden_BxCxD, g_BxCxV, preferred_element_type=f32)
    return d_hidden, d_unembed.astype(unembed_DxV.dtype)


_chunk_logits.defvjp(_chunk_logits_fwd, _chunk_logits_bwd)


def _token_logps(hidden_BxCxD: Array, unembed_DxV: Array, targets_BxC: Array) -> Array:
    """log softmax(h W)[target] for one chunk, in float32."""
    logits_BxCxV = _chunk_logits(hidden_BxCxD, unembed_DxV)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return target_BxC - lse_BxC


def sequence_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    input_ids_BxT: Array,
    completion_mask_BxT: Array,
    *,
    chunk_size: int = 128,
) -> tuple[Array, Array]:
    """Summed log-probs of the completion tokens of each row.

    ``logps[b] = sum_t completion_mask[b, t] * log p(input_ids[b, t] | hidden[b, t - 1])``. The
    shift happens here, so the mask is given in ``input_ids`` coordinates (1 on completion
    tokens, 0 on prompt and padding).

    Args:
      hidden_BxTxD: final-norm hidden states (any float dtype; the matmul accumulates in f32).
      unembed_DxV: output projection.
      input_ids_BxT: token ids of each row.
      completion_mask_BxT: 1 where the token's log-prob counts.
      chunk_size: time steps per chunk; logits exist for ``B x chunk_size x V`` at a time.

    Returns:
      ``(logps_B, counts_B)``, float32 sums and token counts.
    """
    logps_1xB, counts_1xB = segment_logps(
        hidden_BxTxD, unembed_DxV, input_ids_BxT, completion_mask_BxT[None], chunk_size=chunk_size
    )
    return logps_1xB[0], counts_1xB[0]


def segment_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    input_ids_BxT: Array,
    masks_KxBxT: Array,
    *,
    chunk_size: int = 128,
) -> tuple[Array, Array]:
    """Like :func:`sequence_logps` for K masks over the same rows, in one pass of the head.

    Used by prompt-prefix sharing, where one row holds both completions of a pair.

    Args:
      hidden_BxTxD: final-norm hidden states.
      unembed_DxV: output projection.
      input_ids_BxT: token ids of each row.
      masks_KxBxT: K masks in ``input_ids`` coordinates.
      chunk_size: time steps per chunk.

    Returns:
      ``(logps_KxB, counts_KxB)``.
    """
    B, T, D = hidden_BxTxD.shape
    K = masks_KxBxT.shape[0]
    zeros_Bx1 = jnp.zeros_like(input_ids_BxT[:, :1])
    targets_BxT = jnp.concatenate([input_ids_BxT[:, 1:], zeros_Bx1], axis=1)
    masks_KxBxT = jnp.concatenate(
        [masks_KxBxT[:, :, 1:], jnp.zeros_like(masks_KxBxT[:, :, :1])], axis=2
    ).astype(jnp.float32)
    C = max(1, min(chunk_size, T))
    pad = -T % C
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
        masks_KxBxT = jnp.pad(masks_KxBxT, ((0, 0), (0, 0), (0, pad)))
    n = (T + pad) // C
    hidden_NxBxCxD = hidden_BxTxD.reshape(B, n, C, D).swapaxes(0, 1)
    targets_NxBxC = targets_BxT.reshape(B, n, C).swapaxes(0, 1)
    masks_NxKxBxC = masks_KxBxT.reshape(K, B, n, C).transpose(2, 0, 1, 3)
    chunk_fn = jax.checkpoint(_token_logps)

    def body(acc_KxB, xs):
        h_BxCxD, t_BxC, m_KxBxC = xs
        logps_BxC = chunk_fn(h_BxCxD, unembed_DxV, t_BxC)
        return acc_KxB + jnp.sum(logps_BxC[None] * m_KxBxC, axis=-1), None

    logps_KxB, _ = jax.lax.scan(
        body, jnp.zeros((K, B), jnp.float32), (hidden_NxBxCxD, targets_NxBxC, masks_NxKxBxC)
    )
    return logps_KxB, jnp.sum(masks_KxBxT, axis=-1)


def token_logps(
    hidden_BxTxD: Array, unembed_DxV: Array, targets_BxT: Array, *, chunk_size: int = 128
) -> Array:
    """Per-token ``log p(targets[b, t] | hidden[b, t])``, float32 ``[B, T]``, in bounded memory.

    The same chunked head as :func:`segment_logps` (logits exist for ``B x chunk_size x V`` at a
    time, recomputed per chunk in the backward), for callers that sum the tokens themselves, e.g.
    packed rows holding several sequences. No shift happens here: ``targets`` are given at the
    position that predicts them.
    """
    B, T, D = hidden_BxTxD.shape
    C = max(1, min(chunk_size, T))
    pad = -T % C
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    n = (T + pad) // C
    hidden_NxBxCxD = hidden_BxTxD.reshape(B, n, C, D).swapaxes(0, 1)
    targets_NxBxC = targets_BxT.reshape(B, n, C).swapaxes(0, 1)
    chunk_fn = jax.checkpoint(_token_logps)

    def body(_, xs):
        h_BxCxD, t_BxC = xs
        return None, chunk_fn(h_BxCxD, unembed_DxV, t_BxC)

    _, logps_NxBxC = jax.lax.scan(body, None, (hidden_NxBxCxD, targets_NxBxC))
    return logps_NxBxC.swapaxes(0, 1).reshape(B, n * C)[:, :T]


def naive_sequence_logps(
    hidden_BxTxD: Array, unembed_DxV: Array, input_ids_BxT: Array, completion_mask_BxT: Array
) -> tuple[Array, Array]:
    """The same sums through full [B, T, V] float32 logits: the reference for tests and benchmarks."""
    targets_BxT, mask_BxT = shift_targets(input_ids_BxT, completion_mask_BxT)
    logps_BxT = _token_logps(hidden_BxTxD, unembed_DxV, targets_BxT)
    return jnp.sum(logps_BxT * mask_BxT, axis=-1), jnp.sum(mask_BxT, axis=-1)
