"""LlamaConfig: the Llama-3 family's shape, RoPE, dtype and compilation settings, with presets.

`LlamaConfig.from_hf` reads a Hugging Face `config.json` (dict or path) in both the
transformers-4 layout (`rope_theta` + `rope_scaling`) and the transformers-5 layout
(`rope_parameters`); `to_hf` writes a dict that either version loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from apo_jax.errors import UserError

REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")


class ConfigError(UserError, ValueError):
    """A LlamaConfig field or a Hugging Face config.json that this model cannot represent."""


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
    rope_scaling: Llama3RopeScaling | None = None  # None = plain RoPE
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares embed_tokens
    max_seq_len: int = 512  # HF max_position_embeddings
    param_dtype: str = "float32"  # master weights
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: str = "none"  # 'none' | 'full' | 'save_dots' per layer
    scan_layers: bool = True  # stacked params + lax.scan; False = unrolled python loop
    attention: str = "auto"  # 'xla' | 'cudnn' (GPU flash) | 'blocked' | 'auto', see models.md

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
        if rs is not None and not isinstance(rs, Llama3RopeScaling):
            raise ConfigError("LlamaConfig.rope_scaling must be a Llama3RopeScaling or None")
        if rs is not None and rs.high_freq_factor <= rs.low_freq_factor:
            raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")

    def replace(self, **overrides: Any) -> LlamaConfig:
        """Returns a copy with `overrides` applied (validated again)."""
        return dataclasses.replace(self, **_coerce(overrides))

    @property
    def n_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        D, F, Dh = self.d_model, self.mlp_dim, self.head_dim
        attn = D * Dh * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * D * F + 2 * D
        emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + D

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> LlamaConfig:
        """Builds a config from a Hugging Face Llama `config.json`.

        Args:
          config: the parsed dict, a path to `config.json`, or a checkpoint directory.
          **overrides: LlamaConfig fields that replace the read values (dtype, remat, ...).

        Returns:
          The LlamaConfig. Raises ConfigError when the checkpoint is not a Llama this model supports.
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        hf = config
        if hf.get("model_type") != "llama":
            raise ConfigError(f"not a Llama checkpoint: model_type={hf.get('model_type')!r}")
        for key, bad in (("attention_bias", True), ("mlp_bias", True)):
            if hf.get(key, False) == bad:
                raise ConfigError(f"unsupported Llama variant: {key}={bad}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; Llama uses 'silu'")
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        kind = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
        params = {**legacy, **rope}
        max_len = int(hf.get("max_position_embeddings", 2048))
        if kind == "default":
            scaling = None
        elif kind == "llama3":
            scaling = Llama3RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", max_len)
                ),
            )
        else:
            raise ConfigError(f"unsupported rope type {kind!r}; supported: 'default', 'llama3'")
        n_heads = int(hf["num_attention_heads"])
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
            mlp_dim=int(hf["intermediate_size"]),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=max_len,
        )
        fields.update(_coerce(overrides))
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """Returns a Hugging Face `LlamaForCausalLM` config dict (readable by transformers 4 and 5)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta}
            rope.update(dataclasses.asdict(self.rope_scaling))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.mlp_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,  # transformers 4 name
            "dtype": self.param_dtype,  # transformers 5 name
        }


def _coerce(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(overrides)
    if isinstance(out.get("rope_scaling"), dict):
        out["rope_scaling"] = Llama3RopeScaling(**out["rope_scaling"])
    return out


_BIG = dict(rope_theta=500_000.0, rms_norm_eps=1e-5, param_dtype="float32", dtype="bfloat16")
_SCALE_32 = Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
PRESETS: dict[str, LlamaConfig] = {
    # CPU tests and the embedded demo.
    "tiny": LlamaConfig(),
    # Llama-3.2-1B.
    "llama3_1b": LlamaConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        mlp_dim=8192, rope_scaling=_SCALE_32, tie_embeddings=True, max_seq_len=131072, **_BIG,
    ),
    # Llama-3.2-3B.
    "llama3_3b": LlamaConfig(
        vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
        mlp_dim=8192, rope_scaling=_SCALE_32, tie_embeddings=True, max_seq_len=131072, **_BIG,
    ),
    # Llama-3-8B(-Instruct), the paper's model. For Llama-3.1-8B override
    # rope_scaling={'factor': 8.0} and max_seq_len=131072.
    "llama3_8b": LlamaConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        mlp_dim=14336, tie_embeddings=False, max_seq_len=8192, remat="save_dots", **_BIG,
    ),
    # Llama-3-70B(-Instruct).
    "llama3_70b": LlamaConfig(
        vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
        mlp_dim=28672, tie_embeddings=False, max_seq_len=8192, remat="full", **_BIG,
    ),
}  # fmt: skip


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """Returns the named preset with `overrides` applied.

    Args:
      name: one of `PRESETS` ('tiny', 'llama3_1b', 'llama3_3b', 'llama3_8b', 'llama3_70b').
      **overrides: LlamaConfig fields to replace, e.g. `vocab_size=1024, dtype='bfloat16'`.

    Returns:
      The validated LlamaConfig.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
