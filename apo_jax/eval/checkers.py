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


def demo(row: Mapping[str, Any], response: str) -> bool:
    """True when `response` gives the right answer to a demo question.

    Raises:
      ValueError: for a question that is not in the demo's wording.
    """
    q = _question(row)
    if m := re.fullmatch(r"What is (" + _INT + r") ([+*-]) (" + _INT + r")\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        want = {"+": a + b, "-": a - b, "*": a * b}[op]
        return _last_int(response, r"answer is") == want
    if m := re.fullmatch(r"Sort these numbers in ascending order: ([\d, ]+)\.", q):
        want = sorted(int(x) for x in m[1].split(","))
        got = [int(x) for x in re.findall(r"\d+", response.rsplit(":", 1)[-1])]
        return got == want
    if m := re.fullmatch(r"How many times does the letter '(.)' appear in the word '(\w+)'\?", q):
        return _last_int(response, r"appears") == m[2].count(m[1])
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", q):
        return _last_int(response, r"larger number is") == max(int(m[1]), int(m[2]))
    if m := re.fullmatch(r"Reverse the letters of the word '(\w+)'\.", q):
        quoted = re.findall(r"'([^']*)'", response)
        return bool(quoted) and quoted[-1] == m[1][::-1]
    raise ValueError(f"not a demo question: {q[:80]!r}")


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
