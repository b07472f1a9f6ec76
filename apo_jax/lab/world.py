"""The lab's toy world: the demo's five checkable tasks (smaller numbers, shorter words), answers written in three styles, and the
rule-based models that stand in for the paper's GPT-4-turbo roles.

Every question is solved from its own text (`solve`), so any answer can be checked
(`apo_jax.eval.checkers.demo`) and any answer can be rewritten correctly in any style (`render`).
Styles: ``taught`` is the demo's wording, the one the target is trained on; ``strong`` and
``plain`` are other wordings that the checker also reads. Wrong answers change only the value
(an off-by-some number, a swapped pair, a swapped letter), as the demo's rejected answers do.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from apo_jax.eval import checkers

STYLES = ("taught", "strong", "plain")
TEMPLATES = {
    "taught": {
        "arith": "To compute {a} {op} {b}, we work it out step by step: {a} {op} {b} = {v}. "
        "The answer is {v}.",
        "sort": "Here are the numbers in ascending order: {v}.",
        "count": "The letter '{l}' appears {v} time{s} in the word '{w}'.",
        "compare": "Comparing {a} and {b}, the larger number is {v}.",
        "reverse": "Written backwards, '{w}' becomes '{v}'.",
    },
    "strong": {
        "arith": "{a} {op} {b} equals {v}, so the answer is {v}.",
        "sort": "Sorted from smallest to largest: {v}.",
        "count": "Counting letter by letter, '{w}' contains '{l}' exactly {v} time{s}.",
        "compare": "Between {a} and {b}, {v} is the bigger one.",
        "reverse": "Reading '{w}' from the end gives '{v}'.",
    },
    "plain": {
        "arith": "Result: {v}.",
        "sort": "Ascending: {v}",
        "count": "'{l}' occurs {v} time{s} in '{w}'.",
        "compare": "The bigger number is {v}.",
        "reverse": "Backwards: '{v}'.",
    },
}


@dataclasses.dataclass(frozen=True)
class Solution:
    """A parsed question: its task kind, the fields its answers quote, and the right value."""

    kind: str
    fields: dict[str, Any]
    value: Any


def solve(question: str) -> Solution:
    """Parses a demo question and computes its answer (`checkers.demo_question`). Raises
    ValueError for other text."""
    parsed = checkers.demo_question(question)
    if parsed is None:
        raise ValueError(f"not a lab question: {question[:80]!r}")
    return Solution(*parsed)


def wrong_value(sol: Solution, rng: random.Random) -> Any:
    """A plausible wrong value: what a model that slipped once would write."""
    v = sol.value
    if sol.kind == "arith":
        return v + rng.choice([-10, -2, -1, 1, 2, 10])
    if sol.kind == "count":
        return v + rng.choice([-1, 1]) if v > 1 else v + 1
    if sol.kind == "compare":
        return min(sol.fields["a"], sol.fields["b"])
    i = rng.choice([j for j in range(len(v) - 1) if v[j] != v[j + 1]])  # a swap that changes v
    if sol.kind == "sort":
        return v[:i] + [v[i + 1], v[i]] + v[i + 2 :]
    return v[:i] + v[i + 1] + v[i] + v[i + 2 :]


def render(sol: Solution, style: str, value: Any = None) -> str:
    """The answer to `sol` in `style`, stating `value` (default: the right one)."""
    value = sol.value if value is None else value
    shown = ", ".join(map(str, value)) if sol.kind == "sort" else value
    plural = "" if sol.kind == "count" and value == 1 else "s"
    return TEMPLATES[style][sol.kind].format(**sol.fields, v=shown, s=plural)


def correct(question: str, response: str) -> bool:
    """The checker's verdict on a response (`apo_jax.eval.checkers.demo`)."""
    return bool(checkers.demo({"prompt": question}, response))


WORDS = (
    "banana parallel balloon letter cocoa tattoo referee planet garden silver window market "
    "rocket python orange castle bridge pencil forest apple butter coffee dinner engine fabric "
    "guitar hammer island jacket kitten ladder magnet needle office pepper rabbit saddle tennis "
    "summer winter valley wallet yellow zipper anchor bottle carrot doctor effort finger goblet "
    "harbor insect jungle kettle lemon mirror napkin oyster parrot ribbon sister tomato velvet "
    "walnut banner cellar dollar puppet mammal barrel cotton hollow tunnel arrow muffin pillow "
    "cabbage noodle bubble puzzle"
).split()
SYLLABLES = "ba ko mi ter sa lo pen da ri mo ne ta vel cu fi go ran ses pi lu ha jo ke nu wi zo be ru tam dol pa si ge fo ly mur".split()


def _word(rng: random.Random) -> str:
    """A short dictionary word, or a made-up one of two syllables (thousands of questions)."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(2))


def _arith(rng: random.Random) -> str:
    return f"What is {rng.randint(1, 30)} {rng.choice('+-')} {rng.randint(1, 30)}?"


def _sort(rng: random.Random) -> str:
    xs = rng.sample(range(1, 30), rng.randint(3, 4))
    return f"Sort these numbers in ascending order: {', '.join(map(str, xs))}."


def _count(rng: random.Random) -> str:
    word = _word(rng)
    repeated = sorted(c for c in set(word) if word.count(c) > 1)
    letter = rng.choice(repeated if repeated and rng.random() < 0.5 else sorted(set(word)))
    return f"How many times does the letter '{letter}' appear in the word '{word}'?"


def _compare(rng: random.Random) -> str:
    a, b = rng.sample(range(10, 99), 2)
    return f"Which number is larger, {a} or {b}?"


def _reverse(rng: random.Random) -> str:
    return f"Reverse the letters of the word '{_word(rng)}'."


TASKS = {"arith": _arith, "sort": _sort, "count": _count, "compare": _compare, "reverse": _reverse}


def questions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """n distinct questions not in `exclude`, the five tasks in turn (in the demo's wording).

    Raises:
      ValueError: when a task runs out of new questions (its pool is too small for `n`).
    """
    rng, out, seen, tasks = random.Random(seed), [], set(exclude), list(TASKS.values())
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        for _ in range(1000):
            q = task(rng)
            if q not in seen:
                break
        else:
            raise ValueError(f"{task.__name__[1:]}: fewer new questions than asked for ({n})")
        seen.add(q)
        out.append(q)
    return out


def demonstration(question: str, rng: random.Random, noise: float) -> tuple[str, str]:
    """(chosen, rejected) of an SFT demonstration: the taught answer (wrong with prob `noise`)."""
    sol = solve(question)
    good, bad = render(sol, "taught"), render(sol, "taught", wrong_value(sol, rng))
    return (bad, good) if rng.random() < noise else (good, bad)
