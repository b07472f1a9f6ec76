"""Llama building blocks in flax.nnx: Linear, Embed, RMSNorm, RoPE, attention masks.

Every parameter carries its logical axes in `out_sharding` metadata (with `eager_sharding=False`,
so construction never needs a mesh); `apo_jax.sharding` maps them to the mesh. A `Linear` declares
its optional parts: `bias` (None without one) and the LoRA adapters (`lora_a`, `lora_b` of the
variable type `LoraParam`, `lora_key`), None until `apo_jax.models.lora.attach` sets them; without
them it is a plain matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax.models.config import LinearRopeScaling, LlamaConfig

INIT_STD = 0.02  # Hugging Face LlamaConfig.initializer_range


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: tuple[str, ...],
    dtype: str,
    fill: float | None = None,
) -> nnx.Param:
    """A parameter with logical axes `axes`: N(0, 0.02), or the constant `fill`."""
    if fill is not None:
        value = jnp.full(shape, fill, jnp.dtype(dtype))
    else:
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype))
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class LoraParam(nnx.Param):
    """A LoRA adapter matrix: the only trainable variable of a LoRA run."""


class LoraKey(nnx.Variable):
    """Per-layer LoRA dropout state, uint32 [..., 3]: a PRNG key's two words and an on flag.

    Stored with the flag 0 (no dropout: evaluation, sampling, export); the train step fills in a
    fresh key and sets the flag (`apo_jax.models.lora.fill_dropout_keys`).
    """


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ scale * dropout(x) @ lora_a @ lora_b), kernel stored [in, out].

    Hugging Face stores the transpose of `kernel`. The adapters `lora_a [in, r]`, `lora_b [r, out]`
    (and `lora_key`, the dropout state, with LoRA dropout) are None until
    `apo_jax.models.lora.attach` sets them.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str, str],
        cfg: LlamaConfig,
        *,
        rngs,
        bias: bool = False,
    ):
        self.kernel = param(rngs, (d_in, d_out), axes, cfg.param_dtype)
        # zeros, as Hugging Face initializes it
        self.bias = param(None, (d_out,), axes[1:], cfg.param_dtype, fill=0.0) if bias else None
        # LoRA, set by lora.attach; nnx.data: the variables replace the Nones later.
        self.lora_a: LoraParam | None = nnx.data(None)  # [in, r]
        self.lora_b: LoraParam | None = nnx.data(None)  # [r, out]
        self.lora_key: LoraKey | None = nnx.data(None)  # dropout state, with lora.dropout > 0
        self.lora_scale = 0.0  # alpha / r
        self.lora_dropout = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = add_bias(jnp.dot(x, self.kernel[...].astype(x.dtype)), self)
        return y + self.lora_delta(x) if self.has_lora else y

    def lora_delta(self, x: jax.Array) -> jax.Array:
        """scale * dropout(x) @ lora_a @ lora_b, in the dtype of `x`."""
        if self.lora_key is not None:
            x = _lora_dropout(x, self.lora_key[...], self.lora_dropout)
        h = jnp.dot(x, self.lora_a[...].astype(x.dtype))
        # The scale goes on B ([r, out], small), not on the [.., out] product.
        return jnp.dot(h, (self.lora_b[...] * self.lora_scale).astype(x.dtype))


def add_bias(y: jax.Array, linear: Linear) -> jax.Array:
    """y + linear.bias when the layer has one."""
    if linear.bias is None:
        return y
    return y + linear.bias[...].astype(y.dtype)


def _lora_dropout(x: jax.Array, key_bits: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of `x` when the key's flag word is set, else `x` unchanged."""
    key = jax.random.wrap_key_data(key_bits[:2])
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    dropped = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
    return jnp.where(key_bits[2] > 0, dropped, x)


def stacked_matmul(x_BxTxD: jax.Array, *linears: Linear) -> list[jax.Array]:
    """``[x @ l.kernel for l in linears]`` as one matmul against the kernels stacked on a new axis.

    x is read once and the wider matmul runs faster on CPU; the kernels (same shape) keep their
    layout and sharding, the new axis is unsharded. A linear's LoRA adapters add their own term.
    """
    w_DxSxF = jnp.stack([lin.kernel[...] for lin in linears], axis=1).astype(x_BxTxD.dtype)
    y_BxTxSxF = jnp.einsum("btd,dsf->btsf", x_BxTxD, w_DxSxF)
    ys = [add_bias(y_BxTxSxF[:, :, i], lin) for i, lin in enumerate(linears)]
    return [
        y + lin.lora_delta(x_BxTxD) if lin.has_lora else y
        for y, lin in zip(ys, linears, strict=True)
    ]


class Embed(nnx.Module):
    """Token embedding table [V, D]; Gemma multiplies the rows by sqrt(D) in the table's dtype."""

    def __init__(self, cfg: LlamaConfig, *, rngs):
        shape = (cfg.vocab_size, cfg.d_model)
        self.embedding = param(rngs, shape, ("vocab", "embed"), cfg.param_dtype)
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else None

    def __call__(self, ids_BxT: jax.Array, dtype: jnp.dtype) -> jax.Array:
        x_BxTxD = jnp.take(self.embedding[...], ids_BxT, axis=0)
        if self.scale is not None:
            x_BxTxD = x_BxTxD * jnp.asarray(self.scale, x_BxTxD.dtype)
        return x_BxTxD.astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in Hugging Face Llama: normalize in float32, scale in the input dtype.

    With `cfg.norm_offset` (Gemma) the scale is (offset + w), w starts at 0, and the product is
    taken in float32 before casting back, as Hugging Face's Gemma3RMSNorm does.
    """

    def __init__(self, dim: int, cfg: LlamaConfig):
        fill = 1.0 - cfg.norm_offset
        self.scale = param(None, (dim,), ("norm",), cfg.param_dtype, fill=fill)
        self.eps = cfg.rms_norm_eps
        self.offset = cfg.norm_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies [Dh/2] (float32), with the `llama3` or `linear` rule when configured.

    `local=True` gives the sliding layers' table when `cfg.rope_local_theta` is set (Gemma 3:
    base 1e4, never scaled).
    """
    dim = cfg.head_dim
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    local = local and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = (1.0 / (np.float32(theta) ** exps)).astype(np.float64)
    rs = None if local else cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if isinstance(rs, LinearRopeScaling):
        return inv_freq.astype(np.float32) / np.float32(rs.factor)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    positions_BxT: jax.Array, cfg: LlamaConfig, local: bool = False
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, Dh] (float32) for the given positions (`local`: sliding layers)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg, local))
    freqs_BxTxR = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb_BxTxDh = jnp.concatenate([freqs_BxTxR, freqs_BxTxR], axis=-1)
    return jnp.cos(emb_BxTxDh), jnp.sin(emb_BxTxDh)


def apply_rope(x_BxTxNxDh: jax.Array, cos_BxTxDh: jax.Array, sin_BxTxDh: jax.Array) -> jax.Array:
    """Rotates query/key heads (Hugging Face `rotate_half` convention), computed in float32."""
    x = x_BxTxNxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_BxTxDh[:, :, None, :] + rotated * sin_BxTxDh[:, :, None, :]
    return out.astype(x_BxTxNxDh.dtype)


def attention_mask(
    input_shape: tuple[int, int],
    segment_ids_BxT: jax.Array | None = None,
    attn_mask_BxTxT: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, T] mask (True = query t may attend key s).

    Causal, and within the same nonzero segment; an explicit `attn_mask_BxTxT` replaces the
    segment rule (it is still intersected with causality). The diagonal is always allowed so that
    padding rows (segment 0, or an all-False explicit row) give finite outputs, never NaN.
    """
    B, T = input_shape
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    if attn_mask_BxTxT is not None:
        mask_BxTxT = attn_mask_BxTxT.astype(bool) & causal_TxT
    elif segment_ids_BxT is not None:
        seg_q, seg_k = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
        mask_BxTxT = causal_TxT & (seg_q == seg_k) & (seg_k != 0)
    else:
        mask_BxTxT = jnp.broadcast_to(causal_TxT, (B, T, T))
    return mask_BxTxT | jnp.eye(T, dtype=bool)


def sliding_window_mask(
    mask_BxTxS: jax.Array, q_positions_BxT: jax.Array, k_positions_BxS: jax.Array, window: int
) -> jax.Array:
    """`mask_BxTxS` restricted to keys fewer than `window` positions back (Mistral, Gemma 3).

    Distances are RoPE positions, not row indices, so a prefix row's second completion (whose
    positions continue from the prompt) and a packed row's sequences keep the window they would
    have alone; Hugging Face's rule is the same (key index > query index - window).
    """
    dist_BxTxS = q_positions_BxT[:, :, None] - k_positions_BxS[:, None, :]
    return mask_BxTxS & (dist_BxTxS < window)


def cached_attention(
    q_BxTxHxDh: jax.Array,
    k_BxKxSxDh: jax.Array,
    v_BxKxSxDh: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """Grouped-query attention of T queries over a KV cache stored heads-major, [B, K, S, Dh].

    The arithmetic of `jax.nn.dot_product_attention`'s XLA path (float32 logits scaled after the
    dot, masked to a large negative, float32 softmax). The layout is the point: with the batch
    dimensions (B, K) leading, XLA:CPU's batched matmuls read the cache where it is; a cache of
    [B, S, K, Dh] was transposed whole by every layer of every decode step.

    Args:
      q_BxTxHxDh: queries; head h reads kv head h // (H // K), as Hugging Face's `repeat_kv`.
      k_BxKxSxDh: cached keys.
      v_BxKxSxDh: cached values.
      mask_BxTxS: True = may attend.
      scale: logit scale.

    Returns:
      [B, T, H, Dh] in the dtype of `q_BxTxHxDh`.
    """
    B, T, H, Dh = q_BxTxHxDh.shape
    K = k_BxKxSxDh.shape[1]
    q_BxKxGxTxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)
    logits_BxKxGxTxS = jnp.einsum(
        "bkgtd,bksd->bkgts",
        q_BxKxGxTxDh,
        k_BxKxSxDh.astype(q_BxTxHxDh.dtype),
        preferred_element_type=jnp.float32,
    ) * jnp.float32(scale)
    large_negative = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, large_negative)
    probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(q_BxTxHxDh.dtype)
    out_BxTxKxGxDh = jnp.einsum(
        "bkgts,bksd->btkgd", probs_BxKxGxTxS, v_BxKxSxDh.astype(q_BxTxHxDh.dtype)
    )
    return out_BxTxKxGxDh.reshape(B, T, H, Dh)


def blocked_causal_attention(
    q_BxTxHxDh: jax.Array,
    k_BxTxKxDh: jax.Array,
    v_BxTxKxDh: jax.Array,
    mask_BxTxT: jax.Array | None,
    scale: float,
    *,
    block: int = 64,
    max_blocks: int = 8,
) -> jax.Array:
    """Causal self-attention by query blocks, each against only the keys up to its own end.

    The full [T, T] score square of a plain implementation spends half its work above the
    diagonal, where causality masks everything. Here the queries split into n blocks (n = T //
    `block`, at most `max_blocks`), and block i scores only keys 0..end_i: (n + 1) / 2n of the
    square (56% at n = 8), every key a query may see still included, so the result equals full
    causal attention. Heads are grouped K x G, each group's G * block queries one matmul against its
    K/V head. Scores and softmax in float32; `mask_BxTxT` (True = may attend, e.g. segments or
    prompt-prefix branches) is intersected with causality.

    Returns:
      [B, T, H, Dh] in the dtype of `q`.
    """
    B, T, H, Dh = q_BxTxHxDh.shape
    K = k_BxTxKxDh.shape[2]
    G = H // K
    n = max(1, min(max_blocks, T // block))
    ends = [round((i + 1) * T / n) for i in range(n)]
    q_BxKxGxTxDh = q_BxTxHxDh.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)
    k_BxKxTxDh = k_BxTxKxDh.astype(q_BxTxHxDh.dtype).transpose(0, 2, 1, 3)
    v_BxKxTxDh = v_BxTxKxDh.astype(q_BxTxHxDh.dtype).transpose(0, 2, 1, 3)
    outs = []
    start = 0
    for end in ends:
        Q = end - start
        q_BxKxQxDh = q_BxKxGxTxDh[:, :, :, start:end].reshape(B, K, G * Q, Dh)
        s_BxKxQxS = jnp.einsum(
            "bkqd,bksd->bkqs",
            q_BxKxQxDh,
            k_BxKxTxDh[:, :, :end],
            preferred_element_type=jnp.float32,
        )
        s_BxKxGxQxS = s_BxKxQxS.reshape(B, K, G, Q, end) * scale
        allowed = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        if mask_BxTxT is not None:
            allowed = allowed & mask_BxTxT[:, None, None, start:end, :end]
        s_BxKxGxQxS = jnp.where(allowed, s_BxKxGxQxS, jnp.finfo(jnp.float32).min)
        p_BxKxQxS = jax.nn.softmax(s_BxKxGxQxS, axis=-1).reshape(B, K, G * Q, end)
        o_BxKxQxDh = jnp.einsum(
            "bkqs,bksd->bkqd", p_BxKxQxS.astype(v_BxKxTxDh.dtype), v_BxKxTxDh[:, :, :end]
        )
        outs.append(o_BxKxQxDh.reshape(B, K, G, Q, Dh))
        start = end
    out_BxKxGxTxDh = jnp.concatenate(outs, axis=3) if n > 1 else outs[0]
    return out_BxKxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
