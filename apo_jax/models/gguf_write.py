"""GGUF files out: a model and its tokenizer as one file llama.cpp and transformers read.

`write_gguf(model, cfg, tokenizer, path, dtype)` writes, with `gguf.GGUFWriter`:

- the `{arch}.*` hyper-parameters llama.cpp reads for the family (context length, embedding and
  feed-forward sizes, block count, head counts, key/value length, RoPE base and scaling, RMSNorm
  epsilon, vocabulary size, gemma3's sliding window) and `general.file_type`;
- the tokenizer (`gguf_vocab`): model, pre-tokenizer, tokens, scores or merges, token types,
  bos/eos/pad/unk ids, `add_bos_token`, the chat template;
- every tensor under its GGUF name, with llama.cpp's conventions re-applied (q/k rows permuted for
  `llama`, (1 + w) norms for `gemma3`, `llama3` RoPE scaling as a `rope_freqs` tensor).

2-D weights take the chosen dtype (f32, f16, bf16 or q8_0; a q8_0 weight whose rows are not a
multiple of 32 falls back to f16, as llama.cpp's converter does); 1-D tensors (norms, biases) stay
float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gguf
import jax
import numpy as np
from flax import nnx

from apo_jax.errors import UserError
from apo_jax.models import gguf_read, gguf_vocab, layers
from apo_jax.models.config import LinearRopeScaling, Llama3RopeScaling, LlamaConfig

Q = gguf.GGMLQuantizationType
DTYPES = {  # --dtype -> (2-D tensor type, general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
_ARCH = {family: arch for arch, (family, _) in gguf_read.ARCHITECTURES.items()}
_ARCH["mistral"] = "llama"  # as llama.cpp's converter writes it (without a sliding window)


class ExportError(UserError, ValueError):
    """A model that cannot be written as GGUF; the message names the field and why."""


def check_exportable(cfg: LlamaConfig) -> str:
    """The GGUF architecture for `cfg`; raises ExportError for what llama.cpp's family fixes."""
    if cfg.family not in _ARCH:
        raise ExportError(
            f"family {cfg.family!r} has no GGUF architecture here; supported: "
            f"{', '.join(sorted(_ARCH))}"
        )
    if cfg.family == "gemma3":
        want = dict(
            rope_local_theta=gguf_read.GEMMA3_LOCAL_THETA, query_pre_attn_scalar=float(cfg.head_dim)
        )
        for field, value in want.items():
            if getattr(cfg, field) != value:
                raise ExportError(
                    f"gemma3 in llama.cpp has {field}={value}; this model has {getattr(cfg, field)}"
                )
    elif cfg.sliding_window is not None and any(cfg.sliding_layers):
        raise ExportError(
            f"family {cfg.family!r} with sliding-window layers: llama.cpp's "
            f"{_ARCH[cfg.family]} runs every layer with full attention"
        )
    return _ARCH[cfg.family]


def hf_tensors(model: Any, cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (Hugging Face name, float32 array in HF `[out, in]` layout), one layer slice at a time."""
    from apo_jax.models.hf import hf_layout

    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for p, layer, name, transpose in hf_layout(cfg):
        value = flat[p].get_value()
        arr = np.asarray(jax.device_get(value[layer] if layer is not None else value), np.float32)
        yield name, (arr.T if transpose else arr)


def _hparams(w: gguf.GGUFWriter, cfg: LlamaConfig, arch: str) -> None:
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if isinstance(cfg.rope_scaling, LinearRopeScaling):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if arch == "gemma3" and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)


def _rope_freqs(cfg: LlamaConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs`: per frequency, the divisor the `llama3` rule applies."""
    return layers.rope_inv_freq(cfg.replace(rope_scaling=None)) / layers.rope_inv_freq(cfg)


def _encode(arr: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    if arr.ndim == 1 or qtype == Q.F32:
        return np.ascontiguousarray(arr, np.float32), Q.F32
    if qtype == Q.Q8_0 and arr.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        qtype = Q.F16
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, np.float16), Q.F16
    return gguf.quants.quantize(np.ascontiguousarray(arr, np.float32), qtype), qtype


def write_gguf(
    model: Any,
    cfg: LlamaConfig,
    tokenizer: Any,
    tok_dir: str,
    path: str,
    dtype: str = "f32",
    name: str = "apo_jax model",
) -> dict[str, int]:
    """Writes `model` with its tokenizer to the GGUF file `path`.

    Args:
      model: the model (any family `gguf_read.ARCHITECTURES` maps).
      cfg: its config.
      tokenizer: its `transformers` tokenizer (fast).
      tok_dir: the tokenizer's directory (for llama.cpp's pre-tokenizer name).
      path: the file to write (the caller renames it into place).
      dtype: f32, f16, bf16 or q8_0 for the 2-D weights.
      name: `general.name`.

    Returns:
      {tensor type name: count} of the written tensors.
    """
    arch = check_exportable(cfg)
    qtype, file_type = DTYPES[dtype]
    vocab = gguf_vocab.vocab_metadata(tokenizer, cfg.vocab_size, tok_dir)
    names = gguf_read.gguf_name_map(cfg, arch)
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    _hparams(w, cfg, arch)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocab.write_vocab(w, vocab)
    counts: dict[str, int] = {}
    if isinstance(cfg.rope_scaling, Llama3RopeScaling):
        w.add_tensor("rope_freqs.weight", _rope_freqs(cfg).astype(np.float32))
        counts["F32"] = 1
    for hf_name, arr in hf_tensors(model, cfg):
        arr = _redo(arr, hf_name, cfg, arch)
        data, used = _encode(arr, qtype)
        raw = None if used in (Q.F32, Q.F16) else used
        w.add_tensor(names[hf_name], data, raw_dtype=raw)
        counts[used.name] = counts.get(used.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def _redo(w: np.ndarray, hf_name: str, cfg: LlamaConfig, arch: str) -> np.ndarray:
    if arch in gguf_read.PERMUTED_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return gguf_read.permute_qk(w, cfg.n_heads if "q_proj" in hf_name else cfg.n_kv_heads)
    if arch in gguf_read.NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        return w + np.float32(1.0)
    return w
