"""Prompt rows for evaluation: read, validate, and reject with a stable reason.

A row holds a prompt string (in ``prompt``, or the field named by ``prompt_field``), rendered as
one user turn, or ``messages``, a chat whose last turn is the user's; a prompt field that holds a
message list is read as a chat too. Its id is ``id``, else ``uid`` (Arena-Hard's questions), else
its row number. Rows come from ``.jsonl``, ``.json``, ``.parquet`` files and ``datasets``
directories through :mod:`apo_jax.data.ingest`. A row that cannot be evaluated becomes a reject
``{"index", "file", "line", "id", "field", "reason", "detail"}``; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from apo_jax.data import ingest
from apo_jax.errors import UserError

# Stable reject reasons (rejects.jsonl and summary.json count them by these names).
MALFORMED_JSON = "malformed_json"
NON_UTF8 = "non_utf8"
NOT_AN_OBJECT = "not_an_object"
NO_PROMPT = "no_prompt"
PROMPT_AND_MESSAGES = "prompt_and_messages"
PROMPT_NOT_STRING = "prompt_not_string"
EMPTY_PROMPT = "empty_prompt"
BAD_MESSAGES = "bad_messages"
LAST_TURN_NOT_USER = "last_turn_not_user"
BAD_ID = "bad_id"
DUPLICATE_ID = "duplicate_id"
TEMPLATE_ERROR = "template_error"  # set when rendering (generation.encode_examples)
PROMPT_TOO_LONG = "prompt_too_long"  # likewise


class PromptsError(UserError):
    """The prompts input cannot be read at all (missing file, unreadable dataset)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One valid prompt row."""

    index: int  # row number in the input, 0-based
    id: Any  # the row's id (str or int)
    prompt: Any  # the prompt as given: the string or the message list
    messages: tuple[dict[str, str], ...]  # the chat to render, ending with the user's turn
    record: dict[str, Any]  # the whole input row (exports and checkers read its other fields)


class _Reject(Exception):
    def __init__(self, field: str, reason: str, detail: str = "", row_id: Any = None):
        super().__init__(reason)
        self.field, self.reason, self.detail, self.row_id = field, reason, detail, row_id


def _messages(value: Any, field: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _Reject(field, BAD_MESSAGES, "expected a non-empty list of {role, content}")
    turns = []
    for i, m in enumerate(value):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise _Reject(field, BAD_MESSAGES, f"turn {i} is not {{role: str, content: str}}")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "user":
        raise _Reject(field, LAST_TURN_NOT_USER, f"the last turn is {turns[-1]['role']!r}")
    if not any(t["content"].strip() for t in turns if t["role"] == "user"):
        raise _Reject(field, EMPTY_PROMPT, "every user turn is empty")
    return tuple(turns)


def _row_id(row: dict[str, Any], index: int) -> Any:
    for key in ("id", "uid"):
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise _Reject(key, BAD_ID, f"must be a string or an integer, got {value!r}"[:200])
            return value
    return index


def parse(payload: Any, index: int, prompt_field: str = "prompt") -> Example:
    """Validates one decoded or raw (bytes) row into an :class:`Example`.

    Raises:
      _Reject: with the field, reason and detail when the row cannot be evaluated.
    """
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Reject("<line>", NON_UTF8, str(e)) from None
        try:
            payload = json.loads(text)
        except ValueError as e:
            raise _Reject("<line>", MALFORMED_JSON, str(e)) from None
    if not isinstance(payload, dict):
        raise _Reject("<row>", NOT_AN_OBJECT, f"got {type(payload).__name__}")
    row_id = _row_id(payload, index)
    has_text = payload.get(prompt_field) is not None
    has_chat = payload.get("messages") is not None and prompt_field != "messages"
    if has_text and has_chat:
        raise _Reject(prompt_field, PROMPT_AND_MESSAGES, "keep one of the two fields")
    if not has_text and not has_chat:
        raise _Reject(prompt_field, NO_PROMPT, f"needs {prompt_field!r} (a string) or 'messages'")
    if has_chat:
        return Example(
            index, row_id, payload["messages"], _messages(payload["messages"], "messages"), payload
        )
    value = payload[prompt_field]
    if isinstance(value, list):
        return Example(index, row_id, value, _messages(value, prompt_field), payload)
    if not isinstance(value, str):
        raise _Reject(prompt_field, PROMPT_NOT_STRING, f"got {type(value).__name__}")
    if not value.strip():
        raise _Reject(prompt_field, EMPTY_PROMPT, "")
    return Example(index, row_id, value, ({"role": "user", "content": value},), payload)


def reject_record(raw: ingest.RawRow, error: _Reject) -> dict[str, Any]:
    """The rejects.jsonl line of a row."""
    return {
        "index": raw.source_index,
        "file": raw.file,
        "line": raw.line,
        "id": error.row_id,
        "field": error.field,
        "reason": error.reason,
        "detail": error.detail[:200],
    }


def read(
    path: str, *, prompt_field: str = "prompt", split: str = "train"
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Reads every row of `path` into examples and rejects (ids unique, input order kept).

    Args:
      path: a .jsonl / .json / .parquet file or a `datasets.save_to_disk` directory.
      prompt_field: the field holding the prompt string.
      split: the split of a DatasetDict directory.

    Returns:
      (examples, rejects), together one entry per input row.
    """
    examples, rejects, seen = [], [], set()
    for raw in _raw_rows(path, split):
        try:
            ex = parse(raw.payload, raw.source_index, prompt_field)
            if str(ex.id) in seen:
                raise _Reject("id", DUPLICATE_ID, "appears earlier in the input", ex.id)
        except _Reject as e:
            rejects.append(reject_record(raw, e))
            continue
        seen.add(str(ex.id))
        examples.append(ex)
    return examples, rejects


def _raw_rows(path: str, split: str) -> Iterator[ingest.RawRow]:
    try:
        yield from ingest.read_rows(path, split=split)
    except ingest.InputError as e:
        raise PromptsError(f"--prompts: {e}") from None
