"""Record types for preference pairs, validation of raw rows, and reject reasons.

A raw row (one JSONL line, one Parquet row, ...) becomes a :class:`Pair` -- the prompt as a
list of chat messages plus the final assistant answer of each side -- or a :class:`Reject`
that says where the row came from, which field is at fault and why. Unpaired rows (TRL's KTO
layout: ``prompt``, ``completion``, ``label``) become an :class:`Unpaired` the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Reject reasons: stable strings, counted in the manifest and written to rejects.jsonl.
MALFORMED_JSON = "malformed_json"
NON_UTF8 = "non_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_ROLE = "bad_role"
EMPTY_PROMPT = "empty_prompt"
EMPTY_COMPLETION = "empty_completion"
IDENTICAL_COMPLETIONS = "identical_completions"
PROMPT_MISMATCH = "prompt_mismatch"
TEMPLATE_NOT_PREFIX = "template_not_prefix_consistent"
TEMPLATE_REWRITES_TEXT = "template_rewrites_text"  # e.g. Qwen3 drops <think> from earlier turns
NO_END_OF_TURN = "no_end_of_turn"
PROMPT_TOO_LONG = "prompt_too_long"
PAIR_TOO_LONG = "pair_too_long"
COMPLETION_TOO_LONG = "completion_too_long"
TEMPLATE_ERROR = "template_error"
TOO_MANY_BYTES = "too_many_bytes"  # rejected by size before tokenizing
SPECIAL_TOKEN_TEXT = "special_token_in_text"  # message text holds a control-token string
UNENCODABLE_TEXT = "unencodable_text"  # e.g. a lone surrogate (valid JSON, not valid UTF-8)
TOO_DEEPLY_NESTED = "too_deeply_nested"  # nesting past Python's recursion limit
ROW_ERROR = "row_error"  # any other failure of one row (the detail names the exception)

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Names of the input fields; change them for datasets that use other names."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str | None = None  # optional field holding a system prompt string
    completion: str = "completion"  # unpaired rows: the one completion
    label: str = "label"  # unpaired rows: True desirable, False undesirable


@dataclasses.dataclass(frozen=True)
class Pair:
    """One validated preference pair.

    ``prompt`` is the conversation before the final answer (all earlier turns kept);
    ``chosen`` and ``rejected`` are the final assistant turn's text.
    """

    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    source_index: int  # position of the row in the whole input, over all files
    file: str
    line: int  # 1-based line (JSONL) or 0-based row (other formats)


@dataclasses.dataclass(frozen=True)
class Unpaired:
    """One validated unpaired example: a prompt, one final assistant answer and its label."""

    prompt: tuple[dict[str, str], ...]
    completion: str
    label: bool  # True: desirable
    source_index: int
    file: str
    line: int


@dataclasses.dataclass(frozen=True)
class Reject:
    """A row that was not written, and why."""

    source_index: int
    file: str
    line: int
    field: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """Returns the rejects.jsonl object for this reject."""
        return dataclasses.asdict(self)


def reject_of_exception(source_index: int, file: str, line: int, e: BaseException) -> Reject:
    """The reject of a row whose processing raised ``e`` (one row never ends a prepare)."""
    if isinstance(e, RecursionError):
        reason = TOO_DEEPLY_NESTED
    elif isinstance(e, UnicodeError):
        reason = UNENCODABLE_TEXT
    else:
        reason = ROW_ERROR
    detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    return Reject(source_index, file, line, "<row>", reason, detail)


class RowError(Exception):
    """Raised while validating a row; carries the field and the reject reason."""

    def __init__(self, field: str, reason: str, detail: str = ""):
        super().__init__(f"{field}: {reason} {detail}")
        self.field, self.reason, self.detail = field, reason, detail


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """Validates a list of chat messages (role/content strings)."""
    if not isinstance(value, (list, tuple)):
        raise RowError(
            field, WRONG_TYPE, f"expected a list of messages, got {type(value).__name__}"
        )
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise RowError(f"{field}[{i}]", WRONG_TYPE, "message is not an object")
        if "role" not in msg or "content" not in msg:
            missing = "role" if "role" not in msg else "content"
            raise RowError(f"{field}[{i}].{missing}", MISSING_FIELD)
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise RowError(f"{field}[{i}].role", BAD_ROLE, f"role {role!r}")
        if not isinstance(content, str):
            raise RowError(f"{field}[{i}].content", WRONG_TYPE, type(content).__name__)
        out.append({"role": role, "content": content})
    return out


def _completion(value: Any, field: str) -> tuple[list[dict[str, str]], str]:
    """Splits a completion field into (history before the answer, final answer text)."""
    if isinstance(value, str):
        return [], value
    msgs = _messages(value, field)
    if not msgs:
        raise RowError(field, EMPTY_COMPLETION, "no messages")
    if msgs[-1]["role"] != "assistant":
        raise RowError(f"{field}[{len(msgs) - 1}].role", BAD_ROLE, "last turn must be assistant")
    return msgs[:-1], msgs[-1]["content"]


def _check_prompt(prompt: list[dict[str, str]], field: str) -> None:
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise RowError(field, EMPTY_PROMPT)
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError(
            f"{field}[{len(prompt) - 1}].role", BAD_ROLE, "turn before the answer must be user"
        )
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i != 0:
            raise RowError(f"{field}[{i}].role", BAD_ROLE, "system turn must come first")


def _resolve_prompt(row: Mapping, fields: FieldMap, hist: list[dict[str, str]]) -> list[dict]:
    """The prompt turns: the completion's own history (full conversations), else the prompt
    field (a string is one user turn), with the optional system field put first; checked."""
    prompt_value = row.get(fields.prompt)
    if hist:  # full conversations carry the prompt themselves (CLAIR, implicit prompt)
        prompt = hist
        if isinstance(prompt_value, list):
            given = _messages(prompt_value, fields.prompt)
            prompt = hist if hist[: len(given)] == given else given + hist
        elif prompt_value is not None and not isinstance(prompt_value, str):
            raise RowError(fields.prompt, WRONG_TYPE, type(prompt_value).__name__)
    elif prompt_value is None:
        raise RowError(fields.prompt, MISSING_FIELD)
    elif isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _messages(prompt_value, fields.prompt)
    if fields.system and row.get(fields.system):
        system = row[fields.system]
        if not isinstance(system, str):
            raise RowError(fields.system, WRONG_TYPE, type(system).__name__)
        if prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}] + prompt
    _check_prompt(prompt, fields.prompt)
    return prompt


def to_pair(row: Any, fields: FieldMap, *, source_index: int, file: str, line: int) -> Pair:
    """Validates one raw row and returns a :class:`Pair`.

    Accepts the CLAIR layout (string ``prompt``; ``chosen``/``rejected`` full message lists
    ending with the assistant turn), TRL conversational (``prompt`` a message list,
    ``chosen``/``rejected`` the assistant turn(s); or implicit prompt: no ``prompt`` field and
    full conversations sharing their history) and TRL standard (all three strings).

    Raises:
      RowError: with the field and reason when the row is unusable.
    """
    if not isinstance(row, Mapping):
        raise RowError("<row>", NOT_AN_OBJECT, type(row).__name__)
    for name in (fields.chosen, fields.rejected):
        if name not in row or row[name] is None:
            raise RowError(name, MISSING_FIELD)
    hist_c, chosen = _completion(row[fields.chosen], fields.chosen)
    hist_r, rejected = _completion(row[fields.rejected], fields.rejected)
    if hist_c != hist_r:
        raise RowError(fields.rejected, PROMPT_MISMATCH, "chosen and rejected histories differ")
    prompt = _resolve_prompt(row, fields, hist_c)
    for name, text in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not text.strip():
            raise RowError(name, EMPTY_COMPLETION, "empty or whitespace-only")
    if chosen.strip() == rejected.strip():
        raise RowError(fields.rejected, IDENTICAL_COMPLETIONS)
    return Pair(tuple(prompt), chosen, rejected, source_index, file, line)


def to_unpaired(row: Any, fields: FieldMap, *, source_index: int, file: str, line: int) -> Unpaired:
    """Validates one unpaired row (TRL's layout) and returns an :class:`Unpaired`.

    Accepts TRL standard (``prompt`` and ``completion`` strings) and conversational (``prompt``
    a message list, ``completion`` the assistant turn(s)), or full conversations in
    ``completion`` without a ``prompt`` field; ``label`` must be a bool.

    Raises:
      RowError: with the field and reason when the row is unusable.
    """
    if not isinstance(row, Mapping):
        raise RowError("<row>", NOT_AN_OBJECT, type(row).__name__)
    for name in (fields.completion, fields.label):
        if name not in row or row[name] is None:
            raise RowError(name, MISSING_FIELD)
    label = row[fields.label]
    if not isinstance(label, bool):
        raise RowError(fields.label, WRONG_TYPE, f"expected true or false, got {label!r}"[:80])
    hist, completion = _completion(row[fields.completion], fields.completion)
    prompt = _resolve_prompt(row, fields, hist)
    if not completion.strip():
        raise RowError(fields.completion, EMPTY_COMPLETION, "empty or whitespace-only")
    return Unpaired(tuple(prompt), completion, label, source_index, file, line)
