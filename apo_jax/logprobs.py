"""Per-sequence log-probabilities of completions, from hidden states, in bounded memory.

The last step of a causal LM maps each hidden state to V logits. With Llama-3's 128,256-token
vocabulary, float32 logits for 16 sequences of 4,096 tokens take 34 GB, and their log-softmax and
backward more. Here the projection, log-softmax and target gather run over chunks of the time
axis in a custom VJP: the forward keeps only each token's logsumexp, and the backward recomputes a
chunk's logits once and forms the logit gradient ``g (onehot - softmax)`` directly, so memory grows
with the chunk, not with T.

Only the positions whose log-prob counts (completion tokens) need logits: callers pass them as
``where``, each row's counted positions move to its front, and chunks that no row needs are
skipped at run time. With half of every row prompt, the head does half the work.
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


def _logits_grads(hidden_BxCxD: Array, unembed_DxV: Array, g_BxCxV: Array):
    """(d hidden in its dtype, d unembedding in float32) of ``h W`` for the logit gradient ``g``:
    both matmuls in the hidden states' dtype, accumulating in float32."""
    dt, f32 = hidden_BxCxD.dtype, jnp.float32
    g_BxCxV = g_BxCxV.astype(dt)
    w_DxV = unembed_DxV.astype(dt)
    d_hidden = jnp.einsum("bcv,dv->bcd", g_BxCxV, w_DxV, preferred_element_type=f32).astype(dt)
    d_unembed = jnp.einsum("bcd,bcv->dv", hidden_BxCxD, g_BxCxV, preferred_element_type=f32)
    return d_hidden, d_unembed


def _chunk_logits_bwd(res, g_BxCxV):
    hidden_BxCxD, unembed_DxV = res
    d_hidden, d_unembed = _logits_grads(hidden_BxCxD, unembed_DxV, g_BxCxV)
    return d_hidden, d_unembed.astype(unembed_DxV.dtype)


_chunk_logits.defvjp(_chunk_logits_fwd, _chunk_logits_bwd)


def _token_logps(hidden_BxCxD: Array, unembed_DxV: Array, targets_BxC: Array) -> Array:
    """log softmax(h W)[target] for one chunk, in float32."""
    return _chunk_forward(hidden_BxCxD, unembed_DxV, targets_BxC)[0]


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

    Used by prompt-prefix sharing, where one row holds both completions of a pair. Only the
    positions some mask counts go through the head (see :func:`token_logps`).

    Args:
      hidden_BxTxD: final-norm hidden states.
      unembed_DxV: output projection.
      input_ids_BxT: token ids of each row.
      masks_KxBxT: K masks in ``input_ids`` coordinates.
      chunk_size: time steps per chunk.

    Returns:
      ``(logps_KxB, counts_KxB)``.
    """
    zeros_Bx1 = jnp.zeros_like(input_ids_BxT[:, :1])
    targets_BxT = jnp.concatenate([input_ids_BxT[:, 1:], zeros_Bx1], axis=1)
    masks_KxBxT = jnp.concatenate(
        [masks_KxBxT[:, :, 1:], jnp.zeros_like(masks_KxBxT[:, :, :1])], axis=2
    ).astype(jnp.float32)
    logps_BxT = token_logps(
        hidden_BxTxD,
        unembed_DxV,
        targets_BxT,
        chunk_size=chunk_size,
        where_BxT=jnp.any(masks_KxBxT > 0, axis=0),
    )
    return jnp.sum(logps_BxT[None] * masks_KxBxT, axis=-1), jnp.sum(masks_KxBxT, axis=-1)


@jax.custom_vjp
def _permute_time(x_BxTxD: Array, order_BxT: Array, inverse_BxT: Array) -> Array:
    """``x[b, order[b, t]]``: a per-row permutation of the time axis (``inverse`` undoes it).

    Its backward applies the inverse permutation, a gather, where autodiff of a gather would
    scatter-add into zeros.
    """
    return jnp.take_along_axis(x_BxTxD, order_BxT[:, :, None], axis=1)


def _permute_time_fwd(x_BxTxD, order_BxT, inverse_BxT):
    return _permute_time(x_BxTxD, order_BxT, inverse_BxT), (order_BxT, inverse_BxT)


def _permute_time_bwd(res, g_BxTxD):
    order_BxT, inverse_BxT = res
    return _permute_time(g_BxTxD, inverse_BxT, order_BxT), None, None


_permute_time.defvjp(_permute_time_fwd, _permute_time_bwd)


def _chunk_forward(hidden_BxCxD: Array, unembed_DxV: Array, targets_BxC: Array):
    """(log-probs of the targets, logsumexp) of one chunk, both float32 [B, C]."""
    logits_BxCxV = _chunk_logits(hidden_BxCxD, unembed_DxV)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return target_BxC - lse_BxC, lse_BxC


@jax.custom_vjp
def _chunked_head(live_N: Array, hidden_NxBxCxD: Array, unembed_DxV: Array, targets_NxBxC: Array):
    """Target log-probs [N, B, C] of N chunks; a chunk whose ``live`` is False is skipped (0)."""
    return _chunked_head_fwd(live_N, hidden_NxBxCxD, unembed_DxV, targets_NxBxC)[0]


def _chunked_head_fwd(live_N, hidden_NxBxCxD, unembed_DxV, targets_NxBxC):
    _, B, C, _ = hidden_NxBxCxD.shape

    def body(_, xs):
        live, h_BxCxD, t_BxC = xs
        zeros_BxC = jnp.zeros((B, C), jnp.float32)
        out = jax.lax.cond(
            live, lambda: _chunk_forward(h_BxCxD, unembed_DxV, t_BxC), lambda: (zeros_BxC,) * 2
        )
        return None, out

    _, (logps_NxBxC, lse_NxBxC) = jax.lax.scan(body, None, (live_N, hidden_NxBxCxD, targets_NxBxC))
    return logps_NxBxC, (live_N, hidden_NxBxCxD, unembed_DxV, targets_NxBxC, lse_NxBxC)


def _chunked_head_bwd(res, g_NxBxC):
    """Recomputes each live chunk's logits once and forms ``g (onehot - softmax)`` from the saved
    logsumexp; both matmuls run in the hidden states' dtype and accumulate in float32."""
    live_N, hidden_NxBxCxD, unembed_DxV, targets_NxBxC, lse_NxBxC = res

    def run(dw_DxV, h_BxCxD, t_BxC, lse_BxC, g_BxC):
        logits_BxCxV = _chunk_logits(h_BxCxD, unembed_DxV)
        vocab_BxCxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2)
        g_BxCx1 = g_BxC[..., None]
        d_BxCxV = jnp.where(vocab_BxCxV == t_BxC[..., None], g_BxCx1, 0.0) - g_BxCx1 * jnp.exp(
            logits_BxCxV - lse_BxC[..., None]
        )
        dh_BxCxD, dw_chunk_DxV = _logits_grads(h_BxCxD, unembed_DxV, d_BxCxV)
        return dw_DxV + dw_chunk_DxV, dh_BxCxD

    def skip(dw_DxV, h_BxCxD, *_):
        return dw_DxV, jnp.zeros_like(h_BxCxD)

    def body(dw_DxV, xs):
        live, *chunk = xs
        return jax.lax.cond(live, run, skip, dw_DxV, *chunk)

    dw0_DxV = jnp.zeros(unembed_DxV.shape, jnp.float32)
    xs = (live_N, hidden_NxBxCxD, targets_NxBxC, lse_NxBxC, g_NxBxC)
    dw_DxV, dh_NxBxCxD = jax.lax.scan(body, dw0_DxV, xs)
    return None, dh_NxBxCxD, dw_DxV.astype(unembed_DxV.dtype), None


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)


def token_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    *,
    chunk_size: int = 128,
    where_BxT: Array | None = None,
) -> Array:
    """Per-token ``log p(targets[b, t] | hidden[b, t])``, float32 ``[B, T]``, in bounded memory.

    The head runs over chunks of ``chunk_size`` time steps: logits exist for
    ``B x chunk_size x V`` at a time, the forward keeps only each token's logsumexp, and the
    backward recomputes a chunk's logits once. No shift happens here: ``targets`` are given at
    the position that predicts them.

    With ``where_BxT`` (True where the log-prob is needed, e.g. completion tokens), the B rows
    are taken as one flat sequence of B * T positions whose needed ones move to its front (a
    stable sort), cut into chunks of ``chunk_size`` positions; chunks past the batch's count of
    needed positions are skipped at run time (``lax.cond``, forward and backward): the head's
    cost follows the completion tokens of the whole batch, not B times its longest row's, so
    prompts, padding and short rows cost no logits. Logits then exist for ``chunk_size x V`` at
    a time. The other positions come back as 0.
    """
    B, T, D = hidden_BxTxD.shape
    if where_BxT is not None:
        # One flat row of B * T positions: the needed ones of every row go to the front together,
        # so the live chunks follow the batch's total count, not B times its longest row's.
        flat = _head_positions(
            hidden_BxTxD.reshape(1, B * T, D),
            unembed_DxV,
            targets_BxT.reshape(1, B * T),
            where_BxT.reshape(1, B * T),
            chunk_size,
        )
        return flat.reshape(B, T)
    return _head_positions(hidden_BxTxD, unembed_DxV, targets_BxT, None, chunk_size)


def _head_positions(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    where_BxT: Array | None,
    chunk_size: int,
) -> Array:
    """:func:`token_logps` on rows as given: chunks of ``chunk_size`` time steps of all B rows."""
    B, T, D = hidden_BxTxD.shape
    if where_BxT is not None:
        where_BxT = where_BxT.astype(bool)
        order_BxT = jnp.argsort(~where_BxT, axis=1, stable=True).astype(jnp.int32)
        inverse_BxT = jnp.argsort(order_BxT, axis=1).astype(jnp.int32)
        hidden_BxTxD = _permute_time(hidden_BxTxD, order_BxT, inverse_BxT)
        targets_BxT = jnp.take_along_axis(targets_BxT, order_BxT, axis=1)
        needed = jnp.max(jnp.sum(where_BxT, axis=1))  # positions per row that need the head
    else:
        needed = T
    C = max(1, min(chunk_size, T))
    pad = -T % C
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    n = (T + pad) // C
    hidden_NxBxCxD = hidden_BxTxD.reshape(B, n, C, D).swapaxes(0, 1)
    targets_NxBxC = targets_BxT.reshape(B, n, C).swapaxes(0, 1)
    live_N = jnp.arange(n) * C < needed
    logps_NxBxC = _chunked_head(live_N, hidden_NxBxCxD, unembed_DxV, targets_NxBxC)
    logps_BxT = logps_NxBxC.swapaxes(0, 1).reshape(B, n * C)[:, :T]
    if where_BxT is None:
        return logps_BxT
    logps_BxT = jnp.take_along_axis(logps_BxT, inverse_BxT, axis=1)
    return jnp.where(where_BxT, logps_BxT, 0.0)


def naive_sequence_logps(
    hidden_BxTxD: Array, unembed_DxV: Array, input_ids_BxT: Array, completion_mask_BxT: Array
) -> tuple[Array, Array]:
    """The same sums through full [B, T, V] float32 logits: the reference for tests and benchmarks."""
    targets_BxT, mask_BxT = shift_targets(input_ids_BxT, completion_mask_BxT)
    logps_BxT = _token_logps(hidden_BxTxD, unembed_DxV, targets_BxT)
    return jnp.sum(logps_BxT * mask_BxT, axis=-1), jnp.sum(mask_BxT, axis=-1)


def ld_mask(chosen_mask_NxT: Array, rejected_mask_NxT: Array, alpha: float) -> tuple[Array, Array]:
    """LD-DPO's token weights (Liu et al., 2024): 1 on the first ``min(|y_w|, |y_l|)`` completion
    tokens of both sides, ``alpha`` on the longer side's tail, 0 off the completions.

    Summing log-probs under these weights (:func:`segment_logps` takes float masks) gives
    TRL's ``ld_alpha`` log-probs, shared + alpha * tail; alpha = 1 is plain DPO. Masks are in
    ``input_ids`` coordinates, one row per pair and side.
    """
    out = []
    cw, cl = (jnp.asarray(m, jnp.float32) for m in (chosen_mask_NxT, rejected_mask_NxT))
    shared_Nx1 = jnp.minimum(jnp.sum(cw, axis=1), jnp.sum(cl, axis=1))[:, None]
    for m_NxT in (cw, cl):
        pos_NxT = jnp.cumsum(m_NxT, axis=1)  # 1-based position within the completion
        out.append(m_NxT * jnp.where(pos_NxT <= shared_Nx1, 1.0, alpha))
    return out[0], out[1]


def wpo_weights(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    input_ids_BxT: Array,
    completion_mask_BxT: Array,
    *,
    chunk_size: int = 128,
) -> Array:
    """WPO's per-sequence weight (Zhou et al., 2024, eq. 2, TRL's ``use_weighting``), no gradient.

    ``w[b] = exp(mean_t (log p_t(y_t) - log sum_v p_t(v)^2))`` over the completion tokens: the
    length-normalized probability of the sequence, each token's probability divided by the
    model's own sum of squared probabilities at that step (its expected probability of a token
    sampled from itself). A pair's loss is multiplied by ``w_chosen * w_rejected``. Time chunks
    of ``chunk_size`` steps bound the logits in memory as :func:`sequence_logps` does.
    """
    hidden_BxTxD = jax.lax.stop_gradient(hidden_BxTxD)
    targets_BxT, mask_BxT = shift_targets(input_ids_BxT, completion_mask_BxT)
    mask_BxT = (mask_BxT > 0).astype(jnp.float32)
    B, T, D = hidden_BxTxD.shape
    C = max(1, min(chunk_size, T))
    pad = -T % C
    h = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    m = jnp.pad(mask_BxT, ((0, 0), (0, pad)))
    n = (T + pad) // C

    def chunk(acc_B, xs):
        h_BxCxD, t_BxC, m_BxC = xs
        logits = jnp.einsum(
            "bcd,dv->bcv",
            h_BxCxD,
            unembed_DxV.astype(h_BxCxD.dtype),
            preferred_element_type=jnp.float32,
        )
        lse = jax.nn.logsumexp(logits, axis=-1)
        log_sum_sq = jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse
        logp = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0] - lse
        return acc_B + jnp.sum((logp - log_sum_sq) * m_BxC, axis=1), None

    xs = (
        h.reshape(B, n, C, D).swapaxes(0, 1),
        t.reshape(B, n, C).swapaxes(0, 1),
        m.reshape(B, n, C).swapaxes(0, 1),
    )
    total_B, _ = jax.lax.scan(chunk, jnp.zeros((B,), jnp.float32), xs)
    return jnp.exp(total_B / jnp.maximum(jnp.sum(mask_BxT, axis=1), 1.0))
