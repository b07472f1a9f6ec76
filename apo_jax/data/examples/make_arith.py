"""Writes the shipped arithmetic pairs and prompts: `python -m apo_jax.data.examples.make_arith
[--out=DIR]` (default: this package's directory). Deterministic: the same files every time.

Each question is one of five kinds (sum, difference, product, a word problem with groups, a word
problem with money left). A pair's rejected answer is written in the step-then-answer style of
SmolLM2-135M-Instruct with one arithmetic mistake of a kind small models make (a dropped carry,
a digit off by one, two digits swapped); its chosen answer is the same text with the mistaken
number corrected wherever it appears, CLAIR's minimal revision. Every row is checked with
`apo_jax.eval.checkers.final_number`: the chosen answer passes, the rejected one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable

from apo_jax.eval.checkers import final_number

N_PAIRS, N_PROMPTS, SEED = 160, 64, 2026
PAIRS_FILE, PROMPTS_FILE = "arith_pairs.jsonl", "arith_prompts.jsonl"
NAMES = ("Sara", "Tom", "Mia", "Leo", "Anna", "Omar", "Lena", "Ravi", "Nora", "Ben")
ITEMS = (
    ("boxes", "pencils"),
    ("bags", "apples"),
    ("shelves", "books"),
    ("packs", "cards"),
    ("trays", "cookies"),
    ("rows", "chairs"),
)


def _sum(r: random.Random) -> tuple[str, int, Callable[[int], str]]:
    a, b = r.randint(120, 899), r.randint(120, 899)
    return (
        f"What is {a} + {b}?",
        a + b,
        lambda v: f"To find the sum, we add {a} and {b}: {a} + {b} = {v}. The answer is {v}.",
    )


def _difference(r: random.Random) -> tuple[str, int, Callable[[int], str]]:
    a = r.randint(400, 999)
    b = r.randint(110, a - 100)
    return (
        f"What is {a} - {b}?",
        a - b,
        lambda v: (
            f"To find the difference, we subtract {b} from {a}: {a} - {b} = {v}. The answer is {v}."
        ),
    )


def _product(r: random.Random) -> tuple[str, int, Callable[[int], str]]:
    a, b = r.randint(12, 98), r.randint(3, 29)
    return (
        f"What is {a} * {b}?",
        a * b,
        lambda v: (
            f"To find the product, we multiply {a} by {b}: {a} * {b} = {v}. The answer is {v}."
        ),
    )


def _groups(r: random.Random) -> tuple[str, int, Callable[[int], str]]:
    name, (group, thing) = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(4, 36), r.randint(6, 48)
    q = f"{name} has {a} {group} with {b} {thing} in each. How many {thing} does {name} have?"
    return (
        q,
        a * b,
        lambda v: (
            f"{name} has {a} {group}, and each has {b} {thing}. To find the total, we "
            f"multiply: {a} * {b} = {v}. So {name} has {v} {thing}. The answer is {v}."
        ),
    )


def _money_left(r: random.Random) -> tuple[str, int, Callable[[int], str]]:
    name = r.choice(NAMES)
    x, y = r.randint(21, 99), r.randint(21, 99)
    have = r.randint(x + y + 12, 500)
    q = (
        f"{name} has ${have}. {name} buys a jacket for ${x} and shoes for ${y}. How many "
        f"dollars does {name} have left?"
    )
    spent = x + y
    return (
        q,
        have - spent,
        lambda v: (
            f"First, we find how much {name} spent: ${x} + ${y} = ${spent}. Then we "
            f"subtract it from ${have}: ${have} - ${spent} = ${v}. {name} has ${v} left. "
            f"The answer is {v}."
        ),
    )


KINDS = (_sum, _difference, _product, _groups, _money_left)


def _mistake(r: random.Random, value: int) -> int:
    """A wrong value a small model writes for `value`: a dropped or extra carry, a digit off by
    one, or two neighbouring digits swapped (never `value` itself, never negative)."""
    digits = str(value)
    options = [value + 10, value - 10, value + 1, value - 1, value + 100, value - 100]
    swaps = [
        int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :])
        for i in range(len(digits) - 1)
        if digits[i] != digits[i + 1]
    ]
    options += [s for s in swaps if len(str(s)) == len(digits)]
    return r.choice([v for v in options if v > 0 and v != value])


def make(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(pairs, prompts): `N_PAIRS` preference pairs and `N_PROMPTS` held-out prompt rows, the
    kinds in turn, no question twice."""
    r, seen, rows = random.Random(seed), set(), []
    while len(rows) < N_PAIRS + N_PROMPTS:
        kind = KINDS[len(rows) % len(KINDS)]
        q, value, say = kind(r)
        if q in seen:
            continue
        seen.add(q)
        rows.append((q, value, say, _mistake(r, value)))
    pairs, prompts = [], []
    for i, (q, value, say, wrong) in enumerate(rows):
        chosen, rejected = say(value), say(wrong)
        row = {"prompt": q, "answer": value}
        if not (final_number(row, chosen) and not final_number(row, rejected)):
            raise AssertionError(
                f"row {i}: the checker does not separate {chosen!r} and {rejected!r}"
            )
        if i < N_PAIRS:
            pairs.append({"prompt": q, "chosen": chosen, "rejected": rejected, "answer": value})
        else:
            prompts.append(row)
    return pairs, prompts


def write(out_dir: str) -> list[str]:
    """Writes both files into `out_dir`; returns their paths."""
    pairs, prompts = make()
    paths = []
    for name, rows in ((PAIRS_FILE, pairs), (PROMPTS_FILE, prompts)):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        paths.append(path)
    return paths


def main() -> None:
    """The command: writes the files and names them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    for path in write(p.parse_args().out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
