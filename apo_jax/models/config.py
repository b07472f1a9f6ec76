"""LlamaConfig: shape, RoPE, dtype and compilation settings of the decoder, with presets.

The family fields (`family`, `qkv_bias`, `qk_norm`, `sliding_window`, `layer_types`,
`rope_local_theta`, `norm_offset`, `embed_scale`, `mlp_activation`, `post_norms`,
`query_pre_attn_scalar`) default to Llama-3. A Hugging Face `config.json` of any family, Llama
included, becomes a LlamaConfig through `families.config_from_hf` and goes back through
`families.to_hf` (the one family table).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from apo_jax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "save_dots")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The `llama3` RoPE frequency rule of Llama 3.1/3.2 (transformers `_compute_llama3_parameters`).

    Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are divided by
    `factor`; shorter than `.../high_freq_factor` are kept; in between they are interpolated.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """The `linear` RoPE rule (Gemma 3's global layers): every inverse frequency divided by `factor`."""

    factor: float = 8.0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-3-style decoder. Hashable, so it can be a static jit arg."""

    vocab_size: int = 512  # V
    d_model: int = 64  # D, HF hidden_size
    n_layers: int = 2  # L
    n_heads: int = 4  # H query heads
    n_kv_heads: int = 2  # K key/value heads (GQA when K < H); H % K == 0
    head_dim: int = 16  # Dh, may differ from D / H
    mlp_dim: int = 192  # F, HF intermediate_size
    rope_theta: float = 500_000.0  # RoPE base
    rope_scaling: Llama3RopeScaling | LinearRopeScaling | None = None  # None = plain RoPE
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares embed_tokens
    max_seq_len: int = 512  # HF max_position_embeddings
    param_dtype: str = "float32"  # master weights
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: str = "none"  # 'none' | 'full' | 'save_dots' per layer
    scan_layers: bool = True  # stacked params + lax.scan; False = unrolled python loop
    attention: str = "auto"  # 'xla' | 'cudnn' (GPU flash) | 'blocked' | 'auto', see models.md
    # Family differences (docs/models.md); the defaults are Llama's.
    family: str = "llama"  # FAMILIES: picks the HF name table and config.json writer
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3, Gemma3)
    sliding_window: int | None = None  # sliding layers see keys < this many positions back
    layer_types: tuple[str, ...] | None = None  # per layer; None: all sliding iff sliding_window
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (None: as global)
    norm_offset: float = 0.0  # RMSNorm scale is (norm_offset + w), all in float32 (Gemma: 1)
    embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
    mlp_activation: str = "silu"  # 'silu' (SwiGLU) | 'gelu_tanh' (GeGLU, Gemma)
    post_norms: bool = False  # RMSNorm on attention and MLP outputs too (Gemma 3 sandwich)
    query_pre_attn_scalar: float | None = None  # attention scale**-2 (None: head_dim)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(
                    f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        if self.mlp_dim <= 0 or self.max_seq_len <= 0:
            raise ConfigError("LlamaConfig.mlp_dim and max_seq_len must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"LlamaConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(
                f"LlamaConfig.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"LlamaConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}"
                )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("LlamaConfig.rope_theta and rms_norm_eps must be positive")
        rs = self.rope_scaling
        if rs is not None and not isinstance(rs, Llama3RopeScaling | LinearRopeScaling):
            raise ConfigError(
                "LlamaConfig.rope_scaling must be a Llama3RopeScaling, LinearRopeScaling or None"
            )
        if isinstance(rs, Llama3RopeScaling) and rs.high_freq_factor <= rs.low_freq_factor:
            raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")
        self._check_family_fields()

    def _check_family_fields(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"LlamaConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ConfigError(
                f"LlamaConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, "
                f"got {self.mlp_activation!r}"
            )
        sw = self.sliding_window
        if sw is not None and (not isinstance(sw, int) or sw <= 0):
            raise ConfigError(
                f"LlamaConfig.sliding_window must be a positive int or None, got {sw!r}"
            )
        lt = self.layer_types
        if lt is not None:
            if not isinstance(lt, tuple) or len(lt) != self.n_layers:
                raise ConfigError(
                    f"LlamaConfig.layer_types must be a tuple of n_layers ({self.n_layers}) names"
                )
            if any(t not in LAYER_TYPES for t in lt):
                raise ConfigError(f"LlamaConfig.layer_types entries must be one of {LAYER_TYPES}")
            if "sliding_attention" in lt and sw is None:
                raise ConfigError(
                    "LlamaConfig.layer_types has sliding layers but no sliding_window"
                )
        for name in ("rope_local_theta", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be positive or None, got {value!r}")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend within `sliding_window` (True) or to every earlier key."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.n_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attn_scale(self) -> float:
        """The factor on query-key scores: query_pre_attn_scalar**-0.5, by default head_dim**-0.5."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **overrides: Any) -> LlamaConfig:
        """Returns a copy with `overrides` applied (validated again)."""
        return dataclasses.replace(self, **_coerce(overrides))

    @property
    def n_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        D, F, Dh = self.d_model, self.mlp_dim, self.head_dim
        attn = D * Dh * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += self.qkv_bias * Dh * (self.n_heads + 2 * self.n_kv_heads) + self.qk_norm * 2 * Dh
        layer = attn + 3 * D * F + (4 if self.post_norms else 2) * D
        emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + D


def _coerce(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(overrides)
    rs = out.get("rope_scaling")
    if isinstance(rs, dict):  # {'rope_type': 'linear', 'factor': f} or the llama3 fields
        rs = dict(rs)
        linear = rs.pop("rope_type", "llama3") == "linear"
        out["rope_scaling"] = LinearRopeScaling(**rs) if linear else Llama3RopeScaling(**rs)
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = tuple(out["layer_types"])
    return out


_BIG = dict(rope_theta=500_000.0, rms_norm_eps=1e-5, param_dtype="float32", dtype="bfloat16")
_BIG_QWEN = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, param_dtype="float32", dtype="bfloat16")
_BIG_MISTRAL = dict(_BIG_QWEN, rms_norm_eps=1e-5)


def _gemma3_layer_types(n_layers: int, period: int = 6) -> tuple[str, ...]:
    """Gemma 3's pattern: every `period`-th layer global, the others sliding."""
    return tuple(
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)
    )


_SCALE_32 = Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
PRESETS: dict[str, LlamaConfig] = {
    # CPU tests and the embedded demo.
    "tiny": LlamaConfig(),
    # Llama-3.2-1B.
    "llama3_1b": LlamaConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        rope_scaling=_SCALE_32,
        tie_embeddings=True,
        max_seq_len=131072,
        **_BIG,
    ),
    # Llama-3.2-3B.
    "llama3_3b": LlamaConfig(
        vocab_size=128256,
        d_model=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        mlp_dim=8192,
        rope_scaling=_SCALE_32,
        tie_embeddings=True,
        max_seq_len=131072,
        **_BIG,
    ),
    # Llama-3-8B(-Instruct), the paper's model. For Llama-3.1-8B override
    # rope_scaling={'factor': 8.0} and max_seq_len=131072.
    "llama3_8b": LlamaConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        tie_embeddings=False,
        max_seq_len=8192,
        remat="save_dots",
        **_BIG,
    ),
    # Llama-3-70B(-Instruct).
    "llama3_70b": LlamaConfig(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        mlp_dim=28672,
        tie_embeddings=False,
        max_seq_len=8192,
        remat="full",
        **_BIG,
    ),
    # Qwen2.5-7B(-Instruct): bias on q/k/v.
    "qwen2_5_7b": LlamaConfig(
        family="qwen2",
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        mlp_dim=18944,
        qkv_bias=True,
        max_seq_len=32768,
        remat="full",
        **_BIG_QWEN,
    ),
    # Qwen3-8B: q/k RMSNorm per head.
    "qwen3_8b": LlamaConfig(
        family="qwen3",
        vocab_size=151936,
        d_model=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        mlp_dim=12288,
        qk_norm=True,
        max_seq_len=40960,
        remat="full",
        **_BIG_QWEN,
    ),
    # Mistral-7B-v0.3(-Instruct), no sliding window. For v0.1 override sliding_window=4096,
    # rope_theta=1e4, vocab_size=32000.
    "mistral_7b": LlamaConfig(
        family="mistral",
        vocab_size=32768,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        max_seq_len=32768,
        remat="full",
        **_BIG_MISTRAL,
    ),
    # Gemma-3-4B(-it), the text decoder: 5 sliding layers (window 1024, RoPE base 1e4) per global
    # one (base 1e6, linear x8), sandwich norms, GeGLU, tied 262k vocabulary.
    "gemma3_4b": LlamaConfig(
        family="gemma3",
        vocab_size=262208,
        d_model=2560,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        mlp_dim=10240,
        tie_embeddings=True,
        max_seq_len=131072,
        remat="full",
        qk_norm=True,
        sliding_window=1024,
        layer_types=_gemma3_layer_types(34),
        rope_theta=1_000_000.0,
        rope_scaling=LinearRopeScaling(8.0),
        rope_local_theta=10_000.0,
        norm_offset=1.0,
        embed_scale=True,
        mlp_activation="gelu_tanh",
        post_norms=True,
        query_pre_attn_scalar=256.0,
        rms_norm_eps=1e-6,
        param_dtype="float32",
        dtype="bfloat16",
    ),
}


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """Returns the named preset with `overrides` applied.

    Args:
      name: one of `PRESETS` ('tiny', 'llama3_1b', 'llama3_3b', 'llama3_8b', 'llama3_70b',
        'qwen2_5_7b', 'qwen3_8b', 'mistral_7b', 'gemma3_4b').
      **overrides: LlamaConfig fields to replace, e.g. `vocab_size=1024, dtype='bfloat16'`.

    Returns:
      The validated LlamaConfig.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
