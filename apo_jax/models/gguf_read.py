"""GGUF files in: llama.cpp's metadata and tensors as a `LlamaConfig` and Hugging Face tensors.

The file is read with the format's own library (`gguf.GGUFReader`); every tensor type that
`gguf.quants.dequantize` supports (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants, ...) comes
out as float32 in Hugging Face's `[out, in]` layout. What llama.cpp's converter changed on the way
in is undone here:

- `llama`: q and k rows were permuted from Hugging Face's rotate-half RoPE layout into
  interleaved pairs per head (`unpermute_qk` reverses it);
- `gemma3`: every RMSNorm weight was stored as (1 + w); we keep `w`;
- `llama3` RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency divisors, not
  as metadata: it is matched against the `llama3` rule's known settings (`_llama3_scaling`).

GGUF names map to Hugging Face names through `gguf.get_tensor_name_map` (the library's table);
the model's own table (`hf.hf_layout`) says which tensors to expect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from apo_jax.errors import UserError
from apo_jax.models import families, layers
from apo_jax.models.config import (
    ConfigError,
    LinearRopeScaling,
    Llama3RopeScaling,
    LlamaConfig,
    _gemma3_layer_types,
)

# GGUF `general.architecture` -> our family (gguf's MODEL_ARCH for the tensor-name table)
ARCHITECTURES = {
    "llama": ("llama", gguf.MODEL_ARCH.LLAMA),
    "qwen2": ("qwen2", gguf.MODEL_ARCH.QWEN2),
    "qwen3": ("qwen3", gguf.MODEL_ARCH.QWEN3),
    "gemma3": ("gemma3", gguf.MODEL_ARCH.GEMMA3),
}
PERMUTED_QK = ("llama",)  # llama.cpp permutes q/k rows of these architectures
NORM_PLUS_ONE = ("gemma3",)  # llama.cpp stores (1 + w) for every RMSNorm of these
GEMMA3_LOCAL_THETA = 10_000.0  # llama.cpp fixes these for gemma3 (not in the metadata)
GEMMA3_PERIOD = 6
_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
# Known `llama3` settings (Llama 3.1: x8, Llama 3.2: x32); the factor itself is read from the file.
_LLAMA3_CANDIDATES = ((1.0, 4.0, 8192),)
_REQUIRED = object()


class GGUFError(UserError, ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the problem."""


def supported_types() -> list[str]:
    """Names of the tensor types `gguf.quants.dequantize` turns into float32."""
    return sorted(["F32", "F16"] + [t.name for t in gguf.quants._type_traits])


def open_gguf(path: str) -> gguf.GGUFReader:
    """Opens `path` with `gguf.GGUFReader` and checks every tensor's bytes are in the file.

    Raises GGUFError for a missing, truncated or non-GGUF file, or an unsupported tensor type.
    """
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the parser meets arbitrary bytes: any failure means "not GGUF"
        raise GGUFError(f"{path}: not a GGUF file or truncated ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        want = int(t.n_elements) // block * type_size
        if t.data.nbytes != want or t.data_offset + want > size:
            raise GGUFError(
                f"{path}: truncated: tensor {t.name!r} needs {want} bytes at offset "
                f"{t.data_offset}, the file has {size} bytes"
            )
        if t.tensor_type not in _FLOAT_TYPES and t.tensor_type not in gguf.quants._type_traits:
            raise GGUFError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be "
                f"dequantized; supported: {', '.join(supported_types())}"
            )
    return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """The value of metadata `key` (strings decoded, arrays as lists); `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()


def architecture(reader: gguf.GGUFReader) -> str:
    """`general.architecture`, refused in one line when no family here runs it."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{reader.data.filename}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def _one(value: Any, key: str, path: str) -> int:
    """A per-layer array that is constant (llama.cpp may write head counts per layer)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{path}: {key} differs between layers ({value}); not supported")
        value = value[0]
    return int(value)


def config_from_gguf(reader: gguf.GGUFReader, **overrides: Any) -> LlamaConfig:
    """The `LlamaConfig` a GGUF file describes (its `{arch}.*` metadata and tensor shapes).

    Args:
      reader: an open file (`open_gguf`).
      **overrides: LlamaConfig fields to replace (dtype, remat, ...).

    Returns:
      The config. Raises GGUFError for an unsupported architecture or variant.
    """
    path = str(reader.data.filename)
    arch = architecture(reader)
    family = ARCHITECTURES[arch][0]

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        return metadata(reader, f"{arch}.{key}", default)

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path}: no tensor 'token_embd.weight'")
    d_model = int(meta("embedding_length"))
    n_heads = _one(meta("attention.head_count"), "attention.head_count", path)
    head_dim = int(
        meta("attention.key_length", 0) or meta("rope.dimension_count", 0) or d_model // n_heads
    )
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=int(names["token_embd.weight"].data.shape[0]),
        d_model=d_model,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=_one(meta("attention.head_count_kv", n_heads), "head_count_kv", path),
        head_dim=head_dim,
        mlp_dim=_one(meta("feed_forward_length"), "feed_forward_length", path),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        max_seq_len=int(meta("context_length", 2048)),
        rope_theta=float(meta("rope.freq_base", 1e6 if family == "gemma3" else 1e4)),
        tie_embeddings="output.weight" not in names,
        **families.FIXED[family],
    )
    fields["rope_scaling"] = _rope_scaling(reader, arch, fields, path)
    if family == "qwen2":
        fields.update(sliding_window=None, layer_types=None)
    if family == "gemma3":
        fields.update(_gemma3_fields(meta, fields))
    fields.update(overrides)
    try:
        return LlamaConfig().replace(**fields)
    except (ConfigError, ValueError, TypeError) as e:
        raise GGUFError(f"{path}: {e}") from None


def _gemma3_fields(meta, fields: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's gemma3: 5 sliding layers per global one, local RoPE base 1e4, scores scaled by
    head_dim**-0.5 (the 62-layer 27B by (D / H)**-0.5)."""
    n = fields["n_layers"]
    pattern = meta("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # one bool per layer: True = sliding
        types = tuple("sliding_attention" if s else "full_attention" for s in pattern)
    else:
        types = _gemma3_layer_types(n, int(pattern or GEMMA3_PERIOD))
    window = meta("attention.sliding_window", None)
    scalar = fields["d_model"] // fields["n_heads"] if n == 62 else fields["head_dim"]
    return dict(
        rope_local_theta=GEMMA3_LOCAL_THETA,
        query_pre_attn_scalar=float(scalar),
        sliding_window=None if window is None else int(window),
        layer_types=types if window is not None and "sliding_attention" in types else None,
    )


def _rope_scaling(reader, arch: str, fields: dict[str, Any], path: str) -> Any:
    kind = metadata(reader, f"{arch}.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if kind == "linear":
        return LinearRopeScaling(float(metadata(reader, f"{arch}.rope.scaling.factor")))
    if kind not in ("none", ""):
        raise GGUFError(
            f"{path}: unsupported rope scaling type {kind!r}; supported: linear, "
            "llama3 (a rope_freqs tensor)"
        )
    if freqs is None:
        return None
    return _llama3_scaling(np.asarray(freqs.data, np.float32), fields, path)


def _llama3_scaling(factors: np.ndarray, fields: dict[str, Any], path: str) -> Llama3RopeScaling:
    """The `llama3` settings whose per-frequency divisors equal the file's `rope_freqs`."""
    plain = LlamaConfig().replace(
        head_dim=fields["head_dim"], rope_theta=fields["rope_theta"], rope_scaling=None
    )
    base = layers.rope_inv_freq(plain)
    for low, high, original in _LLAMA3_CANDIDATES:
        rs = Llama3RopeScaling(float(factors.max()), low, high, original)
        got = base / layers.rope_inv_freq(plain.replace(rope_scaling=rs))
        if got.shape == factors.shape and np.allclose(got, factors, rtol=1e-4):
            return rs
    raise GGUFError(
        f"{path}: rope_freqs.weight matches no llama3 RoPE setting known here "
        f"(tried low/high/original {_LLAMA3_CANDIDATES})"
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: per head, rows (2, Dh/2) interleaved as (Dh/2, 2)."""
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (H, Dh/2, 2, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of `unpermute_qk`)."""
    rows = w.shape[0]
    w = w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])  # (H, 2, Dh/2, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def gguf_name_map(cfg: LlamaConfig, arch: str) -> dict[str, str]:
    """{Hugging Face tensor name: GGUF tensor name} for every tensor of `cfg` (`hf.hf_layout`)."""
    from apo_jax.models.hf import hf_layout

    table = gguf.get_tensor_name_map(ARCHITECTURES[arch][1], cfg.n_layers)
    out = {}
    for _, _, name, _ in hf_layout(cfg):
        stem, suffix = name.rsplit(".", 1)
        found = table.get_name(stem)
        if found is None:
            raise GGUFError(f"no GGUF name for tensor {name!r} of architecture {arch!r}")
        out[name] = f"{found}.{suffix}"
    return out


def read_tensors(reader: gguf.GGUFReader, cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (Hugging Face name, float32 array in HF layout) for every tensor the model needs.

    Raises GGUFError naming a tensor that is missing or has the wrong shape.
    """
    from apo_jax.models.hf import hf_layout

    path = str(reader.data.filename)
    arch = architecture(reader)
    by_name = {t.name: t for t in reader.tensors}
    names = gguf_name_map(cfg, arch)
    for _, _, hf_name, _ in hf_layout(cfg):
        t = by_name.get(names[hf_name])
        if t is None:
            raise GGUFError(f"{path}: missing tensor {names[hf_name]!r} ({hf_name})")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        want = _hf_shape(cfg, hf_name)
        if w.shape != want:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {w.shape}, expected {want}")
        yield hf_name, _undo(w, hf_name, cfg, arch)


def _undo(w: np.ndarray, hf_name: str, cfg: LlamaConfig, arch: str) -> np.ndarray:
    if arch in PERMUTED_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return unpermute_qk(w, cfg.n_heads if "q_proj" in hf_name else cfg.n_kv_heads)
    if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        return w - np.float32(1.0)
    return w


def _hf_shape(cfg: LlamaConfig, name: str) -> tuple[int, ...]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    d, f = cfg.d_model, cfg.mlp_dim
    table = {
        "embed_tokens.weight": (cfg.vocab_size, d),
        "lm_head.weight": (cfg.vocab_size, d),
        "q_proj.weight": (q, d),
        "k_proj.weight": (kv, d),
        "v_proj.weight": (kv, d),
        "o_proj.weight": (d, q),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "q_norm.weight": (cfg.head_dim,),
        "k_norm.weight": (cfg.head_dim,),
        "gate_proj.weight": (f, d),
        "up_proj.weight": (f, d),
        "down_proj.weight": (d, f),
    }
    key = ".".join(name.split(".")[-2:])
    return table.get(key, (d,))  # every other tensor is a [D] norm
