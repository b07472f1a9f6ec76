"""Ready-made checkers for ``--checker=apo_jax.eval.checkers:<name>``.

- ``demo``: the embedded demo's five tasks (arithmetic, sorting, letter counts, comparisons,
  reversals). The expected answer is computed from the question itself, so the demo's pair files
  (or any prompt file in their wording) need no answer field.
- ``contains_answer``: the row's ``answer`` field (a string, a number or a list of accepted
  strings) occurs in the response, ignoring case and surrounding whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_INT = r"-?\d+"


def _question(row: Mapping[str, Any]) -> str:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = row.get("messages") or prompt or []
    users = [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("the row has no prompt string and no user turn")
    return users[-1]


def _last_int(text: str, after: str = "") -> int | None:
    if after:
        hits = re.findall(after + r"\s*(" + _INT + ")", text)
        if hits:
            return int(hits[-1])
    hits = re.findall(_INT, text)
    return int(hits[-1]) if hits else None


def demo_question(q: str) -> tuple[str, dict[str, Any], Any] | None:
    """(kind, the fields the question quotes, the right answer) of a question in the demo's
    wording; None for any other text."""
    if m := re.fullmatch(r"What is (" + _INT + r") ([+*-]) (" + _INT + r")\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return "arith", {"a": a, "op": op, "b": b}, {"+": a + b, "-": a - b, "*": a * b}[op]
    if m := re.fullmatch(r"Sort these numbers in ascending order: ([\d, ]+)\.", q):
        xs = [int(x) for x in m[1].split(",")]
        return "sort", {"xs": xs}, sorted(xs)
    if m := re.fullmatch(r"How many times does the letter '(.)' appear in the word '(\w+)'\?", q):
        return "count", {"l": m[1], "w": m[2]}, m[2].count(m[1])
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", q):
        a, b = int(m[1]), int(m[2])
        return "compare", {"a": a, "b": b}, max(a, b)
    if m := re.fullmatch(r"Reverse the letters of the word '(\w+)'\.", q):
        return "reverse", {"w": m[1]}, m[1][::-1]
    return None


def demo(row: Mapping[str, Any], response: str) -> bool:
    """True when `response` gives the right answer to a demo question.

    Raises:
      ValueError: for a question that is not in the demo's wording.
    """
    q = _question(row)
    parsed = demo_question(q)
    if parsed is None:
        raise ValueError(f"not a demo question: {q[:80]!r}")
    kind, _, want = parsed
    if kind == "sort":
        return [int(x) for x in re.findall(r"\d+", response.rsplit(":", 1)[-1])] == want
    if kind == "reverse":
        quoted = re.findall(r"'([^']*)'", response)
        return bool(quoted) and quoted[-1] == want
    after = {"arith": r"answer is", "count": r"appears", "compare": r"larger number is"}[kind]
    return _last_int(response, after) == want


def contains_answer(row: Mapping[str, Any], response: str) -> bool:
    """True when one accepted answer (the row's `answer` field) occurs in `response`.

    Raises:
      ValueError: when the row has no `answer` field.
    """
    if "answer" not in row or row["answer"] is None:
        raise ValueError("the row has no 'answer' field")
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    text = response.casefold()
    return any(str(a).strip().casefold() in text for a in answers if str(a).strip())
