"""Chat-template tokenization: split a pair into prompt ids and completion ids.

The prompt is the conversation rendered with ``add_generation_prompt=True``; each full
conversation (prompt + final assistant answer) is rendered without it. The split is valid only
when the prompt render is a prefix of the full render, both as text and as token ids, and the
template appends something (the end-of-turn token, ``<|eot_id|>`` for Llama-3) after the answer;
the completion ids then hold the answer and that end-of-turn marker.

Two checks run before any tokenizing. A text too large to fit ``max_length`` tokens (more bytes
than ``max_length`` times the tokenizer's longest token) is rejected as ``too_many_bytes``, so a
huge row costs no tokenizer memory. Message text holding a special-token string of the tokenizer
(``<|eot_id|>``, ``<|start_header_id|>`` ...) is rejected as ``special_token_in_text``: the
rendered conversation is tokenized as one string, so such text would become real control tokens
and could forge turns.

A template that does not render a message as written (Qwen3 drops the ``<think>`` reasoning of
assistant turns before the last user turn) is rejected as ``template_rewrites_text``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Any

import numpy as np

from apo_jax import errors
from apo_jax.data import schema

# A truncated prompt (truncation keep_start/keep_end) may hold this many times the bytes that
# max_length tokens can cover; beyond that it is rejected before tokenizing.
TRUNCATED_PROMPT_FACTOR = 8


class TokenizerError(errors.UserError):
    """The tokenizer directory is missing or unusable; the message says what to fix."""


def _tokenizer_class(tokenizer_dir: str) -> Any:
    """PreTrainedTokenizerFast when the config names it (Llama-3); AutoTokenizer (seconds to import) otherwise."""
    import json

    try:
        with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        name = None
    if name in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_dir: str) -> Any:
    """Loads a Hugging Face tokenizer from a local directory (no hub access) and checks it has a chat template."""
    if not os.path.isdir(tokenizer_dir):
        raise TokenizerError(
            f"tokenizer directory {tokenizer_dir!r} does not exist (pass --tokenizer DIR)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tok = _tokenizer_class(tokenizer_dir).from_pretrained(tokenizer_dir)
    except Exception as e:
        raise TokenizerError(
            f"cannot load a tokenizer from {tokenizer_dir!r}: {type(e).__name__}: {e}"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise TokenizerError(
            f"tokenizer in {tokenizer_dir!r} has no chat template (add chat_template.jinja)"
        )
    return tok


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    """Returns a sha256 over the tokenizer's files (names and bytes), stable across copies."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(tokenizer_dir)):
        path = os.path.join(tokenizer_dir, name)
        if os.path.isfile(path) and (
            name.endswith((".json", ".jinja", ".model")) or name == "merges.txt"
        ):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except ImportError:  # a missing package is the environment's fault, not the row's
        raise
    except Exception as e:  # jinja raises for conversations the template refuses
        raise schema.RowError("prompt", schema.TEMPLATE_ERROR, f"{type(e).__name__}: {e}") from None


def _encode(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=4)
def _generation_header_ids(tok: Any) -> tuple[int, ...]:
    """Ids the template adds for add_generation_prompt (Llama-3: the assistant header)."""
    msgs = [{"role": "user", "content": "x"}]
    with_header, without = _render(tok, msgs, True), _render(tok, msgs, False)
    if not with_header.startswith(without):
        return ()
    return tuple(_encode(tok, with_header[len(without) :]))


@functools.lru_cache(maxsize=4)
def end_of_turn_ids(tok: Any) -> tuple[int, ...]:
    """The token that ends an assistant turn in the chat template, and the tokenizer's eos.

    Found by rendering a one-turn chat: the first special token after the answer is the
    family's end of turn (`<|eot_id|>` Llama-3, `<|im_end|>` Qwen, `<end_of_turn>` Gemma,
    `</s>` Mistral). Generation stops on these.
    """
    ids = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
    answer = "apo_jax end of turn probe"
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}]
    try:
        text = _render(tok, msgs, False)
    except schema.RowError:
        return tuple(ids)
    at = text.rfind(answer)
    special = set(getattr(tok, "all_special_ids", ())) | {
        i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special
    }
    if at >= 0:
        for tid in _encode(tok, text[at + len(answer) :]):
            if tid in special:
                ids.insert(0, int(tid))
                break
    return tuple(dict.fromkeys(ids))


def _encode_many(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered texts (special tokens come from the template, none are added)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if (
        backend is not None
    ):  # the Rust tokenizer directly; encode_batch's thread pool costs more here
        return [backend.encode(t, add_special_tokens=False).ids for t in texts]
    return [_encode(tok, t) for t in texts]


def _check_history(prompt: list[dict[str, str]], prompt_text: str) -> None:
    """Every prompt message must appear, as written, in the prompt render.

    Qwen3's template drops the `<think>` reasoning of assistant turns before the last user turn,
    so the model would train on a conversation other than the one in the data (and the render
    of a turn depends on what follows it). Such rows are rejected; strip the reasoning from
    earlier turns upstream to keep them.
    """
    for i, message in enumerate(prompt):
        if message["content"].strip() not in prompt_text:
            raise schema.RowError(
                f"prompt[{i}].content",
                schema.TEMPLATE_REWRITES_TEXT,
                "the chat template does not render this message as written (Qwen3 drops the "
                "<think> reasoning of earlier assistant turns)",
            )


def _check_render(prompt_text: str, full_text: str, answer: str, field: str) -> None:
    if not full_text.startswith(prompt_text):
        raise schema.RowError(
            field, schema.TEMPLATE_NOT_PREFIX, "prompt render is not a prefix of the full render"
        )
    completion_text = full_text[len(prompt_text) :]
    stripped = answer.strip()
    at = completion_text.rfind(stripped)
    if at < 0:
        raise schema.RowError(
            field,
            schema.TEMPLATE_REWRITES_TEXT,
            "the answer is not rendered as written (e.g. Qwen3 reformats <think> reasoning)",
        )
    if not completion_text[at + len(stripped) :].strip():
        raise schema.RowError(
            field, schema.NO_END_OF_TURN, "template appends no end-of-turn after the answer"
        )


def split_pair(
    tok: Any, prompt: list[dict[str, str]], chosen: str, rejected: str
) -> tuple[list[int], list[int], list[int]]:
    """Renders prompt, prompt+chosen and prompt+rejected; returns (prompt_ids, chosen_ids, rejected_ids).

    Raises:
      RowError: TEMPLATE_NOT_PREFIX when the prompt render is not a text and token prefix of a
        full render; TEMPLATE_REWRITES_TEXT when a message or the answer is not rendered as
        written; NO_END_OF_TURN when the template appends nothing after the answer.
    """
    prompt_text = _render(tok, prompt, True)
    _check_history(prompt, prompt_text)
    fulls = [
        _render(tok, prompt + [{"role": "assistant", "content": a}], False)
        for a in (chosen, rejected)
    ]
    for field, answer, full_text in (
        ("chosen", chosen, fulls[0]),
        ("rejected", rejected, fulls[1]),
    ):
        _check_render(prompt_text, full_text, answer, field)
    prompt_ids, *full_ids = _encode_many(tok, [prompt_text, *fulls])
    n = len(prompt_ids)
    for field, ids in zip(("chosen", "rejected"), full_ids, strict=True):
        if ids[:n] != prompt_ids:
            raise schema.RowError(
                field,
                schema.TEMPLATE_NOT_PREFIX,
                "token ids merge across the prompt/answer boundary",
            )
    return prompt_ids, full_ids[0][n:], full_ids[1][n:]


def fit_lengths(
    tok: Any,
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
) -> list[int]:
    """Applies the length policy; returns the (possibly truncated) prompt ids.

    A row is ``prompt + completion`` and must fit ``max_length`` for both sides. Only the
    prompt is ever truncated: ``keep_end`` keeps its last tokens; ``keep_start`` keeps its first
    tokens and re-appends the generation header so the answer still follows an assistant header.
    With ``truncation="none"`` a pair that does not fit is rejected.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    header = list(_generation_header_ids(tok))
    if longest + max(len(header), 1) > max_length:
        raise schema.RowError(
            "chosen" if len(chosen_ids) >= len(rejected_ids) else "rejected",
            schema.COMPLETION_TOO_LONG,
            f"{longest} tokens, max_length {max_length}",
        )
    budget = max_length - longest
    if max_prompt_length is not None:
        if len(prompt_ids) > max_prompt_length and truncation == "none":
            raise schema.RowError(
                "prompt", schema.PROMPT_TOO_LONG, f"{len(prompt_ids)} > {max_prompt_length}"
            )
        budget = min(budget, max_prompt_length)
    if len(prompt_ids) <= budget:
        return prompt_ids
    if truncation == "none":
        raise schema.RowError(
            "prompt", schema.PAIR_TOO_LONG, f"{len(prompt_ids)}+{longest} > {max_length}"
        )
    if truncation == "keep_end":
        return prompt_ids[len(prompt_ids) - budget :]
    if truncation == "keep_start":
        if header and prompt_ids[-len(header) :] == header and budget > len(header):
            return prompt_ids[: budget - len(header)] + header
        return prompt_ids[:budget]
    raise ValueError(f"truncation must be none, keep_start or keep_end, got {truncation!r}")


@functools.lru_cache(maxsize=4)
def longest_token_bytes(tok: Any) -> int:
    """An upper bound on the text bytes one token covers: its longest vocabulary string in UTF-8.

    Byte-level and SentencePiece vocabularies spell a token with at least as many UTF-8 bytes
    as the text it stands for ("Ġ" or "▁" for one space, "<0x0A>" for one byte).
    """
    return max(len(t.encode("utf-8")) for t in tok.get_vocab())


@functools.lru_cache(maxsize=4)
def _special_re(tok: Any) -> re.Pattern[str] | None:
    """Matches any special-token string of the tokenizer (added tokens flagged special)."""
    added = getattr(tok, "added_tokens_decoder", {}).values()
    texts = {t.content for t in added if t.special} | set(getattr(tok, "all_special_tokens", ()))
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def find_special_token(tok: Any, text: str) -> str | None:
    """The first special-token string (``<|eot_id|>`` ...) in ``text``, or None.

    Rendered chats are tokenized as one string, so such text would be encoded as the control
    token itself; callers reject it instead.
    """
    special = _special_re(tok)
    found = special.search(text) if special is not None else None
    return found.group(0) if found else None


def _texts(pair: schema.Pair) -> list[tuple[str, str]]:
    """(field, text) of every message of the pair, named as in rejects.jsonl."""
    out = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(pair.prompt)]
    return out + [("chosen", pair.chosen), ("rejected", pair.rejected)]


def check_text(
    tok: Any, pair: schema.Pair, *, max_length: int, max_prompt_length: int | None, truncation: str
) -> None:
    """The checks that run before tokenizing: size in bytes, then special-token strings.

    Raises:
      RowError: TOO_MANY_BYTES when an answer, or the prompt, has more bytes than its token
        budget can cover (``max_length``, or ``max_prompt_length``, times
        :func:`longest_token_bytes`; a prompt that will be truncated may have
        ``TRUNCATED_PROMPT_FACTOR`` times ``max_length``); SPECIAL_TOKEN_TEXT when a message
        holds a special-token string.
    """
    per_token = longest_token_bytes(tok)
    for field, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        n = len(text.strip().encode("utf-8"))
        if n > max_length * per_token:
            raise schema.RowError(
                field, schema.TOO_MANY_BYTES, f"{n} bytes > max_length {max_length} x {per_token}"
            )
    budget = max_length if max_prompt_length is None else min(max_length, max_prompt_length)
    if truncation != "none":
        budget = TRUNCATED_PROMPT_FACTOR * max_length
    n = sum(len(m["content"].strip().encode("utf-8")) for m in pair.prompt)
    if n > budget * per_token:
        raise schema.RowError(
            "prompt", schema.TOO_MANY_BYTES, f"{n} bytes > {budget} tokens x {per_token}"
        )
    for field, text in _texts(pair):
        if found := find_special_token(tok, text):
            raise schema.RowError(field, schema.SPECIAL_TOKEN_TEXT, repr(found))


def encode_pair(
    tok: Any, pair: schema.Pair, *, max_length: int, max_prompt_length: int | None, truncation: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenizes one pair into (prompt_ids, chosen_ids, rejected_ids) int32 arrays.

    Raises:
      RowError: when :func:`check_text`, the template split or the length policy fails.
    """
    check_text(
        tok, pair, max_length=max_length, max_prompt_length=max_prompt_length, truncation=truncation
    )
    p_ids, c_ids, r_ids = split_pair(tok, list(pair.prompt), pair.chosen, pair.rejected)
    p_ids = fit_lengths(
        tok,
        p_ids,
        c_ids,
        r_ids,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation=truncation,
    )
    as32 = functools.partial(np.asarray, dtype=np.int32)
    return as32(p_ids), as32(c_ids), as32(r_ids)
