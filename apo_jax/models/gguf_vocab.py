"""A Hugging Face tokenizer as GGUF tokenizer metadata (the `tokenizer.ggml.*` keys llama.cpp reads).

Two vocabularies are written, chosen from the `tokenizers` model:

- byte-level BPE (GPT-2 style: Llama 3, Qwen, SmolLM) -> `tokenizer.ggml.model = gpt2`: tokens in
  id order, the merges, token types, and `tokenizer.ggml.pre`, the name llama.cpp gives the
  pre-tokenizer split. A directory imported from GGUF keeps the original name under the
  `tokenizer_config.json` key `gguf_pre_tokenizer` (see `PRE_KEY`); otherwise the split regex is
  looked up in transformers' GGUF table (`llama3`, `qwen2`, ...), and failing that it is `default`.
- byte-fallback BPE converted from SentencePiece (Llama 2, Gemma) -> `tokenizer.ggml.model =
  llama`: tokens, scores (`-id`: the vocabulary's order is its merge order) and token types
  (`<0xNN>` bytes, unknown, control, user-defined, normal).

Anything else (WordPiece, Unigram) is refused in one line. Special token ids, `add_bos_token`
and the chat template come from the tokenizer itself.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import gguf

from apo_jax.errors import UserError

PRE_KEY = "gguf_pre_tokenizer"  # tokenizer_config.json key: llama.cpp's pre-tokenizer name
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
T = gguf.TokenType


class VocabError(UserError, ValueError):
    """A tokenizer that cannot be written as GGUF metadata; the message says why."""


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []) or node.get("decoders", []))

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


def _merges(model: dict[str, Any]) -> list[str]:
    """Merges as 'a b' strings (tokenizers writes pairs as lists or as strings)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def vocab_metadata(tok: Any, vocab_size: int, tok_dir: str) -> dict[str, Any]:
    """The tokenizer's GGUF fields.

    Args:
      tok: a `transformers` fast tokenizer.
      vocab_size: the model's embedding rows (the token list is padded to it with unused tokens).
      tok_dir: its directory (for `tokenizer_config.json`'s `gguf_pre_tokenizer`).

    Returns:
      {model, pre, tokens, scores, merges, types, bos, eos, pad, unk, add_bos, chat_template};
      absent entries are None. Raises VocabError for a tokenizer GGUF cannot describe.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabError(
            f"{tok_dir}: tokenizer model {model.get('type')!r} cannot be written to "
            "GGUF here; supported: byte-level BPE, byte-fallback BPE"
        )
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    # an added token past the embedding (transformers' Gemma tokenizer appends <mask>) is dropped
    vocab = {t: i for t, i in tok.get_vocab().items() if i < vocab_size or i not in added}
    if max(vocab.values()) >= vocab_size:
        raise VocabError(
            f"{tok_dir}: the tokenizer has ids up to {max(vocab.values())}, the "
            f"model's embedding only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(T.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(T.NORMAL)
    for i, a in added.items():
        if i < vocab_size:
            types[i] = int(T.CONTROL if a.get("special") else T.USER_DEFINED)
    byte_level = _is_byte_level(spec)
    if not byte_level and not model.get("byte_fallback"):
        raise VocabError(
            f"{tok_dir}: a BPE tokenizer that is neither byte-level nor byte-fallback "
            "cannot be written to GGUF here"
        )
    out: dict[str, Any] = dict(tokens=tokens, types=types, scores=None, merges=None, pre=None)
    if byte_level:
        out.update(model="gpt2", merges=_merges(model), pre=_pre_name(tok_dir, spec))
    else:
        unk = model.get("unk_token")
        for i, token in enumerate(tokens):
            if _BYTE_TOKEN.match(token):
                types[i] = int(T.BYTE)
            elif token == unk:
                types[i] = int(T.UNKNOWN)
        out.update(model="llama", scores=[-float(i) for i in range(vocab_size)])
    out.update(
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=tok.pad_token_id,
        unk=tok.unk_token_id,
        add_bos=getattr(tok, "add_bos_token", None),
        chat_template=tok.chat_template,
    )
    return out


def _pre_name(tok_dir: str, spec: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name: the one recorded on import, else the name transformers'
    GGUF table gives the tokenizer's split regex (e.g. `llama3`, `qwen2`), else `default`."""
    path = os.path.join(tok_dir, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f).get(PRE_KEY)
        if recorded:
            return str(recorded)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # an internal table; without it the name stays `default`
        return "default"
    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    regexes = [n.get("pattern", {}).get("Regex") for n in steps if n.get("type") == "Split"]
    names = [name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regexes[:1] == [regex]]
    return names[0] if names else "default"


def write_vocab(writer: gguf.GGUFWriter, v: dict[str, Any]) -> None:
    """Adds `vocab_metadata`'s fields to `writer`."""
    writer.add_tokenizer_model(v["model"])
    if v["pre"]:
        writer.add_tokenizer_pre(v["pre"])
    writer.add_token_list(v["tokens"])
    writer.add_token_types(v["types"])
    if v["scores"] is not None:
        writer.add_token_scores(v["scores"])
    if v["merges"] is not None:
        writer.add_token_merges(v["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        if v[key] is not None:
            add(int(v[key]))
    if v["add_bos"] is not None:
        writer.add_add_bos_token(bool(v["add_bos"]))
    if v["chat_template"]:
        writer.add_chat_template(v["chat_template"])


def remember_pre(tok_dir: str, pre: str | None) -> None:
    """Records llama.cpp's pre-tokenizer name in `tok_dir`'s tokenizer_config.json (`PRE_KEY`)."""
    if not pre:
        return
    path = os.path.join(tok_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg[PRE_KEY] = pre
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
