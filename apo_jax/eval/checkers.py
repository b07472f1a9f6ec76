"""Ready-made checkers for ``--checker=apo_jax.eval.checkers:<name>``.

- ``demo``: the embedded demo's five tasks (arithmetic, sorting, letter counts, comparisons,
  reversals). The expected answer is computed from the question itself, so the demo's pair files
  (or any prompt file in their wording) need no answer field.
- ``contains_answer``: the row's ``answer`` field (a string, a number or a list of accepted
  strings) occurs in the response, ignoring case and surrounding whitespace.
- ``final_number``: strict: the response states exactly one final answer and it equals the
  row's numeric ``answer`` (rules in `final_number`'s docstring).
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
    kind, fields, want = parsed
    if kind == "count" and not _names_only(response, letter=fields["l"], word=fields["w"]):
        return False  # the right number about another letter or word
    if kind == "sort":
        return [int(x) for x in re.findall(r"\d+", response.rsplit(":", 1)[-1])] == want
    if kind == "reverse":
        quoted = re.findall(r"'([^']*)'", response)
        return bool(quoted) and quoted[-1] == want
    after = {"arith": r"answer is", "count": r"appears", "compare": r"larger number is"}[kind]
    return _last_int(response, after) == want


def _names_only(response: str, *, letter: str, word: str) -> bool:
    """Whether every letter and word the response quotes in the demo's count wording ("the letter
    'x'", "the word 'y'") is the question's."""
    letters = re.findall(r"letter '([^']*)'", response)
    words = re.findall(r"word '([^']*)'", response)
    return all(x == letter for x in letters) and all(w == word for w in words)


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


_NUM = r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]\d)"
_STATED = re.compile(
    r"(?:answer\s*(?:is|:|=)|answer would be|result is|\\boxed\{)\s*\$?\s*(" + _NUM + ")", re.I
)
_HEDGE = re.compile(
    r"\b(?:maybe|perhaps|possibly|probably|either|or|might|could be|around|about|approximately|"
    r"between|roughly)\b",
    re.I,
)
_CUE = re.compile(
    r"(?:=|\bis|\bare|\bwas|\bwere|\bequals?|\bequal to|\bbe|:|\bof|\bgets?|\bhas|\bhave|"
    r"\bhad|\bmakes?|\bgives?|\btotals?|\bleaves?|\bleft with|\bremains?|\bcomes to|\bto)"
    r"\s*(?:a total of\s*|exactly\s*|only\s*)?\$?\s*\Z",
    re.I,
)
_LEADS = re.compile(
    r"\s*(?:is|was)\s+(?:the\s+)?(?:larger|bigger|greater|higher|answer|result)\b", re.I
)
_CHOSEN = re.compile(
    r"(?:larger|bigger|greater|higher|largest|biggest|greatest|highest)"
    r"(?:\s+(?:number|one|value))?\s*(?:is|=|:|would be)\s*(" + _NUM + ")",
    re.I,
)
_QUOTED = re.compile(r"'([^'\s]{1,30})'|\"([^\"]{1,60})\"")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _sentences(text: str) -> list[str]:
    """Sentences (split after . ! ? before a space, and at line breaks), markdown stripped."""
    text = re.sub(r"[*_`#]", "", text)
    return [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]


def _picked(sentence: str, hits: list[re.Match[str]]) -> float | None:
    """A number of the question that the sentence states as the answer ("95 is larger", "the
    larger number is 95"), else None (a restatement, or an answer about something else)."""
    for h in hits:
        if _LEADS.match(sentence, h.end()):
            return _number(h[0])
    m = _CHOSEN.search(sentence)
    return _number(m[1]) if m else None


def _final_value(question: str, response: str) -> float | None:
    """The one final answer a response states, or None (none, several, or not about the
    question's items)."""
    stated = {_number(m[1]) for m in _STATED.finditer(re.sub(r"[*_`]", "", response))}
    if len(stated) > 1:
        return None  # "The answer is 13. The answer is 14."
    numbered = [s for s in _sentences(response) if not s.endswith("?") and re.search(_NUM, s)]
    if not numbered:
        return None  # no answer, or only the question restated as a question
    asked = {_number(h) for h in re.findall(_NUM, question)}
    new = [s for s in numbered if any(_number(h) not in asked for h in re.findall(_NUM, s))]
    last = (new or numbered)[-1]  # a closing restatement of the question is not the answer
    quoted = {a or b for a, b in _QUOTED.findall(last)}
    if any(q not in question for q in quoted):
        return None  # an answer about another item ("the letter 'e' ... in 'haha'")
    hits = list(re.finditer(_NUM, last))
    values = {_number(h[0]) for h in hits}
    if len(values) > 1 and _HEDGE.search(last):
        return None  # "Maybe 12, maybe 13, maybe 14"
    if stated:
        return stated.pop()
    if not new:  # only the question's numbers: one counts only when stated as the answer
        return _picked(last, hits)
    fresh = {_number(h[0]) for h in hits if _number(h[0]) not in asked}
    if len(fresh) == 1:
        return fresh.pop()  # "5 * 5 is equivalent to 25, the result of 5 multiplied by itself"
    start = hits[-2].end() if len(hits) > 1 else 0
    if _CUE.search(last[start : hits[-1].start()]):
        return _number(hits[-1][0])  # "... = 15, so he has 15 books"
    if "=" in last:
        after = [h for h in hits if h.start() > last.rindex("=")]
        return _number(after[0][0]) if after else None
    return None  # several numbers and none of them stated as the result ("74 and 95")


def final_number(row: Mapping[str, Any], response: str) -> bool:
    """True when `response` states exactly one final answer and it equals the row's ``answer``.

    The final answer is the value of "the answer is X" (several different such values: wrong);
    else, in the last sentence holding a number that the question does not hold: the only such
    number, the last number when a verb or "=" leads to it, or the number right after the last
    "=". When no sentence has a new number (comparisons), a number of the question counts only
    when stated as the answer ("95 is larger", "the larger number is 95"). Questions in the
    response are skipped. Wrong: no such number; several numbers with a hedge ("maybe", "or",
    "about" ...); a restated question; a quoted item that the question does not quote (an answer
    about another item). Thousands separators and a trailing period are allowed.

    Raises:
      ValueError: when the row has no numeric ``answer``.
    """
    want = row.get("answer")
    try:
        want = float(str(want).replace(",", ""))
    except (TypeError, ValueError):
        raise ValueError(f"the row's 'answer' is not a number: {want!r}") from None
    got = _final_value(_question(row), response)
    return got is not None and abs(got - want) < 1e-9
