"""The decoder in flax.nnx (Llama-3, Qwen2/2.5, Qwen3, Mistral, Gemma 3), named as Hugging Face's.

Layout: `embed_tokens.embedding [V, D]`, `layers.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}
.kernel [in, out]`, `layers.{input,post_attention}_layernorm.scale [D]`, `norm.scale [D]`,
`lm_head.kernel [D, V]` (absent when tied). Families add `self_attn.{q,k,v}_proj.bias`,
`self_attn.{q,k}_norm.scale [Dh]` and `layers.{pre,post}_feedforward_layernorm.scale` through
`LlamaConfig` fields (docs/models.md); each module declares them, None when its family has none. With `scan_layers` every layer parameter has a leading
L axis (logical axis 'layers') and the layers run as one compiled block under `lax.scan`; layers
of two kinds (Gemma 3's sliding and global) scan a per-layer flag with the parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from apo_jax import sharding
from apo_jax.models.config import LlamaConfig
from apo_jax.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    attention_mask,
    blocked_causal_attention,
    cached_attention,
    rope_cos_sin,
    sliding_window_mask,
    stacked_matmul,
)

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer (k_BxKxSxDh, v_BxKxSxDh)


class Attention(nnx.Module):
    """Grouped-query self-attention: `jax.nn.dot_product_attention` (XLA or cuDNN) or blocked."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = Linear(D, H * Dh, ("embed", "heads"), cfg, rngs=rngs, bias=bias)
        self.k_proj = Linear(D, K * Dh, ("embed", "kv_heads"), cfg, rngs=rngs, bias=bias)
        self.v_proj = Linear(D, K * Dh, ("embed", "kv_heads"), cfg, rngs=rngs, bias=bias)
        self.o_proj = Linear(H * Dh, D, ("heads", "embed"), cfg, rngs=rngs)
        # Qwen3, Gemma 3: one RMSNorm over head_dim on queries and keys, shared by all heads
        self.q_norm = RMSNorm(Dh, cfg) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh, cfg) if cfg.qk_norm else None
        self.shape = (H, K, Dh)
        self.scale = cfg.attn_scale
        self.attention = cfg.attention

    def implementation(self, dtype, cached: bool) -> str:
        """The attention kernel: 'xla', 'cudnn' or 'blocked'.

        'auto' picks cuDNN's fused kernel on GPU for 16-bit compute and head_dim a multiple of 8
        (its limits), `layers.blocked_causal_attention` on CPU (about half the score work of the
        full square), else XLA. Decoding with a KV cache always runs through XLA.
        """
        _, _, Dh = self.shape
        impl = self.attention
        if impl == "auto":
            backend = jax.default_backend()
            fits = jnp.dtype(dtype).itemsize == 2 and Dh % 8 == 0 and Dh <= 128
            impl = (
                "cudnn" if fits and backend == "gpu" else "blocked" if backend == "cpu" else "xla"
            )
        return "xla" if cached else impl

    def __call__(self, x_BxTxD, cos_BxTxDh, sin_BxTxDh, mask_BxTxS, kv=None, cache_index=None):
        H, K, Dh = self.shape
        B, T, _ = x_BxTxD.shape
        q_BxTxHxDh = self.q_proj(x_BxTxD).reshape(B, T, H, Dh)
        k_BxTxKDh, v_BxTxKDh = stacked_matmul(x_BxTxD, self.k_proj, self.v_proj)
        k_BxTxKxDh = k_BxTxKDh.reshape(B, T, K, Dh)
        v_BxTxKxDh = v_BxTxKDh.reshape(B, T, K, Dh)
        if self.q_norm is not None:
            q_BxTxHxDh, k_BxTxKxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxTxKxDh)
        q_BxTxHxDh = apply_rope(q_BxTxHxDh, cos_BxTxDh, sin_BxTxDh)
        k_BxTxKxDh = apply_rope(k_BxTxKxDh, cos_BxTxDh, sin_BxTxDh)
        q_BxTxHxDh = sharding.constrain(q_BxTxHxDh, ("batch", "length", "act_heads", "head_dim"))
        if kv is not None:  # write this step's keys/values into the cache, attend over all of it
            start = (0, 0, cache_index, 0)
            k_BxKxSxDh = jax.lax.dynamic_update_slice(
                kv[0], k_BxTxKxDh.transpose(0, 2, 1, 3).astype(kv[0].dtype), start
            )
            v_BxKxSxDh = jax.lax.dynamic_update_slice(
                kv[1], v_BxTxKxDh.transpose(0, 2, 1, 3).astype(kv[1].dtype), start
            )
            out_BxTxHxDh = cached_attention(
                q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxTxS, self.scale
            )
            return self.o_proj(out_BxTxHxDh.reshape(B, T, H * Dh)), (k_BxKxSxDh, v_BxKxSxDh)
        impl = self.implementation(q_BxTxHxDh.dtype, cached=False)
        if impl == "blocked":
            out_BxTxHxDh = blocked_causal_attention(
                q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxTxS, self.scale
            )
        else:
            out_BxTxHxDh = jax.nn.dot_product_attention(
                q_BxTxHxDh,
                k_BxTxKxDh.astype(q_BxTxHxDh.dtype),
                v_BxTxKxDh.astype(q_BxTxHxDh.dtype),
                mask=None if mask_BxTxS is None else mask_BxTxS[:, None, :, :],
                scale=self.scale,
                is_causal=mask_BxTxS is None,
                implementation="cudnn" if impl == "cudnn" else None,
            )
        return self.o_proj(out_BxTxHxDh.reshape(B, T, H * Dh)), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU (tanh GELU) with `mlp_activation='gelu_tanh'`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_dim
        self.gate_proj = Linear(D, F, ("embed", "mlp"), cfg, rngs=rngs)
        self.up_proj = Linear(D, F, ("embed", "mlp"), cfg, rngs=rngs)
        self.down_proj = Linear(F, D, ("mlp", "embed"), cfg, rngs=rngs)
        self.gelu = cfg.mlp_activation == "gelu_tanh"

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        gate_BxTxF, up_BxTxF = stacked_matmul(x_BxTxD, self.gate_proj, self.up_proj)
        act = functools.partial(jax.nn.gelu, approximate=True) if self.gelu else jax.nn.silu
        h_BxTxF = act(gate_BxTxF) * up_BxTxF
        h_BxTxF = sharding.constrain(h_BxTxF, ("batch", "length", "act_mlp"))
        return self.down_proj(h_BxTxF)


class Block(nnx.Module):
    """One pre-norm decoder layer; with `post_norms` (Gemma 3) also normed after attention and MLP.

    Hugging Face names differ by family: Llama's `post_attention_layernorm` is the norm before
    the MLP; Gemma 3's is the norm of the attention output, and `pre_feedforward_layernorm`
    precedes its MLP.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg)
        # Gemma 3's sandwich norms (cfg.post_norms), else None
        self.pre_feedforward_layernorm = RMSNorm(cfg.d_model, cfg) if cfg.post_norms else None
        self.post_feedforward_layernorm = RMSNorm(cfg.d_model, cfg) if cfg.post_norms else None
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BxTxD, cos_BxTxDh, sin_BxTxDh, mask_BxTxS, kv=None, cache_index=None):
        h_BxTxD, kv = self.self_attn(
            self.input_layernorm(x_BxTxD), cos_BxTxDh, sin_BxTxDh, mask_BxTxS, kv, cache_index
        )
        if self.pre_feedforward_layernorm is not None:
            x_BxTxD = x_BxTxD + self.post_attention_layernorm(h_BxTxD)
            h_BxTxD = self.mlp(self.pre_feedforward_layernorm(x_BxTxD))
            x_BxTxD = x_BxTxD + self.post_feedforward_layernorm(h_BxTxD)
        else:
            x_BxTxD = x_BxTxD + h_BxTxD
            x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        return sharding.constrain(x_BxTxD, ("batch", "length", "act_embed")), kv


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> Block:
    keys = jax.random.split(rngs.params(), cfg.n_layers)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(key):
        return Block(cfg, rngs=nnx.Rngs(params=key))

    return make(keys)


def _save_computed(prim, *_, **__) -> bool:
    """Saveable: matmul outputs (attention's too), reductions and fused attention kernels.

    Everything else is element-wise or data movement (norm scaling, RoPE, softmax's exp, SiLU,
    slices, stacked kernels, transposes), which the backward recomputes from what is saved.
    """
    name = prim.name
    return name == "dot_general" or name.startswith("reduce_") or "attention" in name


def _remat(fn, policy: str, scanned: bool):
    """The layer function under `policy`.

    Scanned layers with 'none' keep every matmul output but recompute the element-wise ops and
    data movement: under `lax.scan` each saved value becomes a stacked [L, ...] buffer that is
    zero-filled and written layer by layer, and the slices, stacked kernels and softmax
    probabilities of a layer cost more to stack than to recompute (docs/performance.md).
    Unrolled layers keep everything: there XLA reads the saved values in place.
    """
    if policy == "none":
        return jax.checkpoint(fn, policy=_save_computed) if scanned else fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


class Llama(nnx.Module):
    """Causal LM of any family in `families.MODEL_TYPES` (Llama-3 with the default config).

    Args:
      cfg: the LlamaConfig.
      rngs: `nnx.Rngs` with a `params` stream (initialization N(0, 0.02), norms at 1).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg, rngs=rngs)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)

    def unembedding(self) -> jax.Array:
        """Returns the output projection [D, V] in param dtype (embedding transposed when tied)."""
        if self.cfg.tie_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
        attn_mask_BxTxT: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Runs the decoder.

        Args:
          input_ids_BxT: int token ids.
          positions_BxT: RoPE positions (default 0..T-1); restart them per packed sequence.
          segment_ids_BxT: 0 = padding, tokens attend causally within their own segment. Leave
            it None for rows of one sequence right-padded: plain causal attention gives the same
            values at every real token, without a [B, T, T] mask.
          attn_mask_BxTxT: True = may attend; replaces the segment rule (causality still holds).
          return_hidden: return the final-norm hidden states instead of logits.

        Returns:
          float32 logits [B, T, V], or hidden states [B, T, D] in the compute dtype.
        """
        B, T = input_ids_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask_BxTxT = None  # plain causal: no mask array (cuDNN's fastest mask type)
        if segment_ids_BxT is not None or attn_mask_BxTxT is not None:
            mask_BxTxT = attention_mask((B, T), segment_ids_BxT, attn_mask_BxTxT)
        local_BxTxT = self.window_mask(mask_BxTxT, positions_BxT, positions_BxT)
        hidden_BxTxD, _ = self.hidden_states(
            input_ids_BxT, positions_BxT, mask_BxTxT, local_mask_BxTxS=local_BxTxT
        )
        if return_hidden:
            return hidden_BxTxD
        return self.logits(hidden_BxTxD)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Final-norm hidden states -> float32 logits [B, T, V]."""
        w_DxV = self.unembedding().astype(hidden_BxTxD.dtype)
        logits_BxTxV = jnp.dot(hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BxTxV, ("batch", "length", "act_vocab"))

    def hidden_states(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        mask_BxTxS: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        local_mask_BxTxS: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The decoder: embeddings, layers and final norm, with an optional KV cache.

        The one forward path: `__call__` runs it without a cache, `generate` with one.

        Args:
          input_ids_BxT: token ids.
          positions_BxT: RoPE positions.
          mask_BxTxS: boolean attention mask over the S keys (S = T without a cache, else the
            cache length); None = causal over T keys.
          cache: one (k, v) pair of shape [B, K, S, Dh] per layer, or None. Scanned layers copy
            it whole (a prefill); decode steps run unrolled (`unrolled`).
          cache_index: where this call's T keys are written in the cache.
          local_mask_BxTxS: the mask of sliding-window layers (`window_mask`); None = the same
            as `mask_BxTxS` (the window covers every key).

        Returns:
          (final-norm hidden states [B, T, D], updated cache or None).
        """
        cfg = self.cfg
        x_BxTxD = self.embed_tokens(input_ids_BxT, jnp.dtype(cfg.dtype))
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", "length", "act_embed"))
        pick = _layer_inputs(cfg, positions_BxT, mask_BxTxS, local_mask_BxTxS)
        sliding = cfg.sliding_layers
        mixed = len(set(sliding)) > 1  # Gemma 3: a per-layer flag is scanned with the params

        def layer_fn(graphdef, local, x, state, kv, flag=None):
            layer = nnx.merge(graphdef, state)
            return layer(x, *pick(flag if local is None else local), kv, cache_index)

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            local = None if mixed else sliding[0]
            step = _remat(functools.partial(layer_fn, graphdef, local), cfg.remat, scanned=True)
            # a cache goes in and out stacked, copied whole: fine for a prefill, not per decode step
            kv = None if cache is None else tuple(jnp.stack(c) for c in zip(*cache, strict=True))
            xs = (state, kv, jnp.asarray(sliding)) if mixed else (state, kv)
            x_BxTxD, kv = jax.lax.scan(lambda x, xs: step(x, *xs), x_BxTxD, xs)
            if cache is not None:
                cache = [(kv[0][i], kv[1][i]) for i in range(cfg.n_layers)]
        else:
            new_cache = []
            for i, block in enumerate(self.layers):
                graphdef, state = nnx.split(block)
                kv = None if cache is None else cache[i]
                step = _remat(
                    functools.partial(layer_fn, graphdef, sliding[i]), cfg.remat, scanned=False
                )
                x_BxTxD, kv = step(x_BxTxD, state, kv)
                new_cache.append(kv)
            cache = None if cache is None else new_cache
        return self.norm(x_BxTxD), cache

    def unrolled(self) -> Llama:
        """This model with its layers unrolled: a Python list of blocks, each holding its own
        slice of the stacked parameters (the same model when the layers are not scanned).

        Decoding with a KV cache runs unrolled: inside the decode loop each layer's weights are
        then loop-invariant arrays, read where they are, and each layer's cache is its own buffer
        updated in place. Under `lax.scan` every step sliced each layer's weights and cache out of
        the stacked arrays and wrote the cache back (docs/performance.md, benchmark 7).
        """
        if not self.cfg.scan_layers:
            return self
        graphdef, state = nnx.split(self)
        view = nnx.merge(graphdef, state)
        layers_graphdef, layers_state = nnx.split(self.layers)
        view.layers = nnx.List(
            nnx.merge(layers_graphdef, jax.tree.map(lambda a, i=i: a[i], layers_state))
            for i in range(self.cfg.n_layers)
        )
        view.cfg = dataclasses.replace(self.cfg, scan_layers=False)
        return view

    def window_mask(
        self, mask_BxTxS: jax.Array | None, q_positions_BxT: jax.Array, k_positions_BxS: jax.Array
    ) -> jax.Array | None:
        """The sliding layers' mask: `mask_BxTxS` (None = causal) within `cfg.sliding_window`.

        None when no layer slides or the window covers all S keys (a key a query may see is
        never more positions back than row indices back, in every layout).
        """
        window, S = self.cfg.sliding_window, k_positions_BxS.shape[1]
        if not any(self.cfg.sliding_layers) or window is None or window >= S:
            return None
        if mask_BxTxS is None:
            mask_BxTxS = attention_mask(q_positions_BxT.shape)
        return sliding_window_mask(mask_BxTxS, q_positions_BxT, k_positions_BxS, window)


def _layer_inputs(cfg: LlamaConfig, positions_BxT, mask_BxTxS, local_mask_BxTxS):
    """A function of a layer's sliding flag (Python or traced bool) -> (cos, sin, mask)."""
    cos_BxTxDh, sin_BxTxDh = rope_cos_sin(positions_BxT, cfg)
    local_cos, local_sin, local_mask = cos_BxTxDh, sin_BxTxDh, mask_BxTxS
    if any(cfg.sliding_layers):
        if cfg.rope_local_theta is not None:
            local_cos, local_sin = rope_cos_sin(positions_BxT, cfg, local=True)
        if local_mask_BxTxS is not None:
            local_mask = local_mask_BxTxS
            if mask_BxTxS is None:  # a traced choice needs two arrays
                mask_BxTxS = attention_mask(positions_BxT.shape)

    def pick(local):
        if isinstance(local, bool):
            if local:
                return local_cos, local_sin, local_mask
            return cos_BxTxDh, sin_BxTxDh, mask_BxTxS

        def choose(a, b):
            return a if a is b else jnp.where(local, a, b)

        return (
            choose(local_cos, cos_BxTxDh),
            choose(local_sin, sin_BxTxDh),
            choose(local_mask, mask_BxTxS),
        )

    return pick
