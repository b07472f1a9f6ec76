"""Task families in natural language for a real instruct target, generated and checkable.

Every question is parsed back from its own text (`solve`), so any response can be checked with
the strict checker (`apo_jax.eval.checkers.final_number`) and answered or revised by the rule-based
stand-ins of `apo_jax.lab.backends`: `render` writes a worked answer in another wording than the
target's, `wrong_value` a plausible slip, and `revise` minimally edits the target's own response
(each wrong "a op b = c" result and the final answer, nothing else).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from apo_jax.eval import checkers

NAMES = "Tom Ana Ravi Mia Ken Lea Omar Sara Ivan Nora Yuki Ben".split()
ITEMS = "apples books pencils cards marbles stickers coins shells stamps cookies".split()


def _add(rng: random.Random) -> str:
    return f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"


def _add1(rng: random.Random) -> str:
    return f"What is {rng.randint(10, 99)} plus {rng.randint(2, 9)}?"


def _sub(rng: random.Random) -> str:
    a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
    return f"What is {a} - {b}?"


MUL1 = ("What is {a} times {b}?", "What is {a} multiplied by {b}?", "Compute {a} x {b}.")


def _mul1(rng: random.Random) -> str:
    """Single-digit products; 64 facts, so three wordings (splits share facts, not prompts)."""
    return rng.choice(MUL1).format(a=rng.randint(2, 9), b=rng.randint(2, 9))


def _mul(rng: random.Random) -> str:
    return f"What is {rng.randint(2, 9)} times {rng.randint(11, 49)}?"


def _word_mul(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"


def _word_add(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 60), rng.randint(3, 39)
    return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"


def _word_sub(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(20, 90)
    b = rng.randint(3, a - 5)
    return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"


def _compare(rng: random.Random) -> str:
    a, b = rng.sample(range(100, 1000), 2)
    return f"Which number is larger, {a} or {b}?"


def _minutes(rng: random.Random) -> str:
    return (
        f"How many minutes are there in {rng.randint(1, 9)} hours and {rng.randint(5, 55)} minutes?"
    )


FAMILIES = {
    "add": _add,
    "add1": _add1,
    "sub": _sub,
    "mul1": _mul1,
    "mul": _mul,
    "word_mul": _word_mul,
    "word_add": _word_add,
    "word_sub": _word_sub,
    "compare": _compare,
    "minutes": _minutes,
}
HELDOUT = "word_add"  # the family no pair is built from (when it is kept; else the last kept one)

_PATTERNS = {
    "add": r"What is (\d+) \+ (\d+)\?",
    "add1": r"What is (\d+) plus (\d+)\?",
    "sub": r"What is (\d+) - (\d+)\?",
    "mul1": r"(?:What is (\d) times (\d)\?|What is (\d) multiplied by (\d)\?|Compute (\d) x (\d)\.)",
    "mul": r"What is (\d+) times (\d+)\?",
    "word_mul": r"(\w+) has (\d+) bags with (\d+) (\w+) in each bag\. How many \w+ does \w+ have\?",
    "word_add": r"(\w+) has (\d+) (\w+) and gets (\d+) more\. How many \w+ does \w+ have now\?",
    "word_sub": r"(\w+) has (\d+) (\w+) and gives away (\d+)\. How many \w+ does \w+ have left\?",
    "compare": r"Which number is larger, (\d+) or (\d+)\?",
    "minutes": r"How many minutes are there in (\d+) hours and (\d+) minutes\?",
}


@dataclasses.dataclass(frozen=True)
class Solution:
    """A parsed question: its family, the fields its answers quote, and the right value."""

    kind: str
    fields: dict[str, Any]
    value: int


def solve(question: str) -> Solution:
    """Parses a question of one of the families. Raises ValueError for other text."""
    for kind, pattern in _PATTERNS.items():
        if m := re.fullmatch(pattern, question.strip()):
            g = [x for x in m.groups() if x is not None]
            if kind == "word_mul":
                a, b = int(g[1]), int(g[2])
                return Solution(kind, {"name": g[0], "item": g[3], "a": a, "b": b}, a * b)
            if kind in ("word_add", "word_sub"):
                a, b = int(g[1]), int(g[3])
                f = {"name": g[0], "item": g[2], "a": a, "b": b}
                return Solution(kind, f, a + b if kind == "word_add" else a - b)
            if kind == "minutes":
                h, m = int(g[0]), int(g[1])
                return Solution(kind, {"a": h, "b": m, "c": h * 60}, h * 60 + m)
            a, b = int(g[0]), int(g[1])
            value = {
                "add": a + b,
                "add1": a + b,
                "sub": a - b,
                "mul": a * b,
                "mul1": a * b,
                "compare": max(a, b),
            }[kind]
            return Solution(kind, {"a": a, "b": b}, value)
    raise ValueError(f"not a lab task: {question[:80]!r}")


def family(question: str) -> str:
    return solve(question).kind


def correct(question: str, response: str) -> bool:
    """The strict checker's verdict (`checkers.final_number`) on a response."""
    return checkers.final_number({"prompt": question, "answer": solve(question).value}, response)


STRONG = {
    "add": "Adding the two numbers: {a} + {b} = {v}. The answer is {v}.",
    "add1": "Adding the two numbers: {a} + {b} = {v}. The answer is {v}.",
    "sub": "Subtracting: {a} - {b} = {v}. The answer is {v}.",
    "mul": "Multiplying: {a} x {b} = {v}. The answer is {v}.",
    "mul1": "Multiplying: {a} x {b} = {v}. The answer is {v}.",
    "word_mul": "{name} has {a} bags of {b} {item}: {a} x {b} = {v}. The answer is {v}.",
    "word_add": "{name} starts with {a} {item} and receives {b}: {a} + {b} = {v}. "
    "The answer is {v}.",
    "word_sub": "{name} starts with {a} {item} and gives {b} away: {a} - {b} = {v}. "
    "The answer is {v}.",
    "compare": "{v} is larger than {o}. The answer is {v}.",
    "minutes": "One hour has 60 minutes: {a} x 60 = {c}, and {c} + {b} = {v} minutes. "
    "The answer is {v}.",
}
PLAIN = "The answer is {v}."
STYLES = {"strong": STRONG, "plain": {k: PLAIN for k in STRONG}}


def render(sol: Solution, style: str = "strong", value: int | None = None) -> str:
    """A worked answer to `sol` in `style` stating `value` (default: the right one)."""
    v = sol.value if value is None else value
    other = sol.fields["b"] if v == sol.fields["a"] else sol.fields["a"]
    return STYLES[style][sol.kind].format(**sol.fields, v=v, o=other)


def wrong_value(sol: Solution, rng: random.Random) -> int:
    """A plausible wrong value: off by a little, off by ten, or the smaller number."""
    if sol.kind == "compare":
        return min(sol.fields["a"], sol.fields["b"])
    return sol.value + rng.choice([-10, -2, -1, 1, 2, 10])


_EXPR = re.compile(r"(\d+(?:\.\d+)?)\s*([+\-x×*])\s*(\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fix_expressions(text: str) -> str:
    """Every "a op b = c" with the right c (left to right, so chained results follow)."""
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "x": lambda a, b: a * b,
        "×": lambda a, b: a * b,
        "*": lambda a, b: a * b,
    }
    pos, fixed = 0, {}  # wrong result -> right one, carried into later operands
    while m := _EXPR.search(text, pos):
        a, b = fixed.get(m[1], m[1]), fixed.get(m[3], m[3])
        right = _fmt(ops[m[2]](float(a), float(b)))
        if right != m[4]:
            fixed[m[4]] = right
        text = (
            text[: m.start()] + f"{a} {m[2]} {b} = {right}" + text[m.end() :]
            if (a != m[1] or b != m[3])
            else text[: m.start(4)] + right + text[m.end(4) :]
        )
        pos = m.start() + len(m[0].split("=")[0]) + 1  # the result may be the next operand
    return text


def revise(question: str, response: str) -> str:
    """The minimal revision of a response: each wrong intermediate result fixed, then the final
    answer; a right response comes back unchanged.

    The final answer is replaced where it is stated (its last occurrence); a response with no
    usable final answer keeps its text and gets "The answer is V." appended.
    """
    if correct(question, response):
        return response
    sol = solve(question)
    fixed = _fix_expressions(response)
    if correct(question, fixed):
        return fixed
    got = checkers._final_value(question, fixed)
    if got is not None:
        hits = [m for m in re.finditer(checkers._NUM, fixed) if checkers._number(m[0]) == got]
        if hits:
            h = hits[-1]
            candidate = fixed[: h.start()] + str(sol.value) + fixed[h.end() :]
            if correct(question, candidate):
                return candidate
    return fixed.rstrip() + f" The answer is {sol.value}."


def questions(
    kind: str, n: int, seed: int, exclude: set[str] = frozenset(), *, strict: bool = True
) -> list[str]:
    """n distinct questions of one family, none in `exclude` (fewer when not `strict` and the
    family's pool runs out).

    Raises:
      ValueError: when `strict` and the family runs out of new questions.
    """
    rng, out, seen = random.Random(f"{seed}:{kind}"), [], set(exclude)
    while len(out) < n:
        for _ in range(1000):
            q = FAMILIES[kind](rng)
            if q not in seen:
                break
        else:
            if not strict:
                return out
            raise ValueError(f"{kind}: fewer new questions than asked for ({n})")
        seen.add(q)
        out.append(q)
    return out
