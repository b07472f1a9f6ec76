"""Tiny GGUF files for the tests, written here with `gguf.GGUFWriter` as llama.cpp lays them out,
and the logits of ours and transformers on them.

`write_model(path, family, qtype)` writes random weights of a tiny llama, qwen2, qwen3 or gemma3
(q/k rows permuted for llama, (1 + w) norms for gemma3, as llama.cpp's converter stores them) with
a tiny tokenizer (SentencePiece-style for gemma3, byte-level BPE otherwise) and a ChatML template.
K-quant weights (no quantizer in `gguf`) are random block bytes with small finite f16 scales.
"""

from __future__ import annotations

import dataclasses
import os

import gguf
import jax.numpy as jnp
import numpy as np

Q = gguf.GGMLQuantizationType
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# where each K-quant block keeps its f16 scales (byte offsets): Q4_K/Q5_K d, dmin first; Q6_K d last
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@dataclasses.dataclass(frozen=True)
class Tiny:
    """Shapes of a tiny model (K-quant ones need every row length a multiple of 256)."""

    d: int = 64
    heads: int = 4
    kv: int = 2
    head_dim: int = 16
    mlp: int = 128
    layers: int = 2
    tied: bool = False
    window: int = 4


def gpt2_vocab() -> dict:
    """A byte-level BPE vocabulary: 3 specials, the 256 byte symbols, 5 merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["h e", "l l", "Ġ w", "o r", "Ġw or"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in merges]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return dict(model="gpt2", tokens=tokens, types=types, merges=merges, bos=1, eos=2, pad=2)


def spm_vocab() -> dict:
    """A SentencePiece-style vocabulary: specials, <0xNN> bytes, a few pieces, ChatML markers."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += ["▁", "a", "b", "▁a", "ab", "<|im_start|>", "<|im_end|>"]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * 5 + [3, 3]
    scores = [0.0] * 260 + [-1.0, -2.0, -3.0, -4.0, -5.0, 0.0, 0.0]
    return dict(model="llama", tokens=tokens, types=types, scores=scores, bos=2, eos=1, pad=0)


def hf_weights(family: str, t: Tiny, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Hugging Face-named float32 weights (std 0.3 so mistakes show in the logits)."""
    rng = np.random.default_rng(seed)
    q, kv = t.heads * t.head_dim, t.kv * t.head_dim

    def r(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    out = {"model.embed_tokens.weight": r(vocab, t.d), "model.norm.weight": r(t.d)}
    if not t.tied:
        out["lm_head.weight"] = r(vocab, t.d)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if family == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(t.layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("q_proj", (q, t.d)),
            ("k_proj", (kv, t.d)),
            ("v_proj", (kv, t.d)),
            ("o_proj", (t.d, q)),
        ):
            out[p + f"self_attn.{name}.weight"] = r(*shape)
        for name, shape in (
            ("gate_proj", (t.mlp, t.d)),
            ("up_proj", (t.mlp, t.d)),
            ("down_proj", (t.d, t.mlp)),
        ):
            out[p + f"mlp.{name}.weight"] = r(*shape)
        for name in norms:
            out[p + f"{name}.weight"] = r(t.d)
        if family in ("gemma3", "qwen3"):
            out[p + "self_attn.q_norm.weight"] = r(t.head_dim)
            out[p + "self_attn.k_norm.weight"] = r(t.head_dim)
        if family == "qwen2":
            for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out[p + f"self_attn.{name}.bias"] = r(n)
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (rotate-half pairs -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def k_quant_bytes(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks for a [rows, cols] tensor, with small finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        scale = rng.uniform(1e-4, 4e-4, size=(rows, cols // block)).astype(np.float16)
        raw[:, :, off : off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, cols // block * size)


_ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}


def gguf_name(hf_name: str, family: str, layers: int) -> str:
    arch = _ARCHS[family]
    stem, suffix = hf_name.rsplit(".", 1)
    return gguf.get_tensor_name_map(arch, layers).get_name(stem) + "." + suffix


def write_model(
    path,
    family: str = "llama",
    qtype: Q = Q.F32,
    t: Tiny | None = None,
    seed: int = 0,
    arch: str | None = None,
    extra=None,
) -> dict:
    """Writes a tiny GGUF; returns {GGUF name: (stored array, its type)} as written.

    `arch` overrides `general.architecture`; `extra` adds {name: (array, raw type)} tensors.
    """
    t = t or Tiny()
    vocab = spm_vocab() if family == "gemma3" else gpt2_vocab()
    V = len(vocab["tokens"])
    rng = np.random.default_rng(seed + 1)
    w = gguf.GGUFWriter(str(path), arch or family)
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(t.d)
    w.add_block_count(t.layers)
    w.add_feed_forward_length(t.mlp)
    w.add_head_count(t.heads)
    w.add_head_count_kv(t.kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(V)
    if family in ("gemma3", "qwen3"):
        w.add_key_length(t.head_dim)
        w.add_value_length(t.head_dim)
        w.add_rope_freq_base(1e6)
        if family == "gemma3":
            w.add_sliding_window(t.window)
    else:
        w.add_rope_dimension_count(t.head_dim)
        w.add_rope_freq_base(1e5)
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_pad_token_id(vocab["pad"])
    w.add_chat_template(CHATML)
    written = {}
    for hf_name, arr in hf_weights(family, t, V, seed).items():
        if family == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = llama_cpp_permute(arr, t.heads if "q_proj" in hf_name else t.kv)
        if family == "gemma3" and hf_name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)
        name = gguf_name(hf_name, family, t.layers)
        if arr.ndim == 1 or qtype == Q.F32:
            data, raw = arr, None
        elif qtype == Q.F16:
            data, raw = arr.astype(np.float16), None
        elif qtype in K_QUANTS:
            data, raw = k_quant_bytes(*arr.shape, qtype, rng), qtype
        else:
            data, raw = gguf.quants.quantize(arr, qtype), qtype
        w.add_tensor(name, data, raw_dtype=raw)
        written[name] = (data, raw or (Q.F16 if data.dtype == np.float16 else Q.F32))
    for name, (data, raw) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


GEMMA_TINY = Tiny(heads=2, kv=1, head_dim=256, layers=6, tied=True, window=4)  # one global layer
TEXT = [{"role": "user", "content": "hello world, hello"}]


def transformers_logits(path, ids) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def ours_logits(model_dir, ids) -> np.ndarray:
    from apo_jax.models.hf import load_hf

    model, _ = load_hf(model_dir)
    return np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]


def chat_ids(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(
        tok.apply_chat_template(TEXT, add_generation_prompt=True, tokenize=True)["input_ids"]
    )
