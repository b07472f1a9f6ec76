"""Rule-based stand-ins for the paper's stronger models, as `apo_jax.clair.client.Backend`s.

The CLAIR builders call them exactly as they call a remote model: chats in, reply strings out.
Each reads the chat the builder wrote (the project's revision and judging prompts) back into
its parts and answers from `apo_jax.lab.world`:

- `Reviser`: the teacher of CLAIR. It fixes a wrong answer by rewriting it correctly in the
  wording the target was taught, so the revision differs from the answer only where the answer
  went wrong; a right answer comes back unchanged (the builder drops it: no signal).
- `Writer`: a model with its own style and accuracy (the stronger model, the off-policy pool).
- `CheckerJudge`: a judge that prefers the checked-correct answer; between two answers the
  checker scores alike it has no preference and, like a position-biased judge, says "A" (the
  builder shows the two in a seeded random order, so that is a coin flip).

Each takes the world it answers from: `apo_jax.lab.world` (the toy world, default) or
`apo_jax.lab.tasks` (the real target's task families, strict checker), whose `revise` edits the
target's own response instead of rewriting it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from apo_jax.clair.cache import Usage
from apo_jax.lab import world

_REVISION_RE = re.compile(r"\nTask:\n(?P<task>.*)\n\nStudent's answer:\n(?P<answer>.*)\n\Z", re.S)
_JUDGE_RE = re.compile(
    r"\nTask:\n(?P<task>.*)\n\n\[Answer A\]\n(?P<a>.*)\n\[End of answer A\]\n\n"
    r"\[Answer B\]\n(?P<b>.*)\n\[End of answer B\]\n",
    re.S,
)


def _last_user(messages: Sequence[Mapping[str, str]]) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def _parts(pattern: re.Pattern[str], text: str, what: str) -> re.Match[str]:
    m = pattern.search(text)
    if m is None:
        raise ValueError(f"not a {what} prompt: {text[:80]!r}")
    return m


class _RuleBackend:
    def __init__(self, name: str, w: Any = world):
        self.model = name
        self.usage = Usage()
        self.world = w

    def complete(self, messages_list: Sequence[Any], params: Mapping[str, Any]) -> list[str]:
        del params  # deterministic rules: sampling settings do not apply
        self.usage.add(completed=len(messages_list))
        return [self.reply(_last_user(m)) for m in messages_list]

    def reply(self, text: str) -> str:
        raise NotImplementedError


class Reviser(_RuleBackend):
    """Minimally revises a student's answer (see the module docstring)."""

    def __init__(self, name: str = "rule-reviser", w: Any = world):
        super().__init__(name, w)

    def reply(self, text: str) -> str:
        m = _parts(_REVISION_RE, text, "revision")
        task, answer = m["task"], m["answer"]
        if self.world.correct(task, answer):
            return f"Reasoning: the answer is right.\nCorrected answer: {answer}"
        if hasattr(self.world, "revise"):
            fixed = self.world.revise(task, answer)
            return (
                "Reasoning: I fix each wrong result and the final answer.\n"
                f"Corrected answer: {fixed}"
            )
        fixed = world.render(world.solve(task), "taught")
        return f"Reasoning: the stated result is wrong; I state the right one.\nCorrected answer: {fixed}"


class Writer(_RuleBackend):
    """Answers questions in one style, right with probability `accuracy` (seeded per question)."""

    def __init__(self, name: str, style: str, accuracy: float, seed: int = 0, w: Any = world):
        super().__init__(name, w)
        self.style, self.accuracy, self.seed = style, accuracy, seed

    def reply(self, text: str) -> str:
        sol = self.world.solve(text)
        rng = random.Random(f"{self.model}:{self.seed}:{text}")
        value = None if rng.random() < self.accuracy else self.world.wrong_value(sol, rng)
        return self.world.render(sol, self.style, value)


class CheckerJudge(_RuleBackend):
    """Judges two answers by the checker (see the module docstring)."""

    def __init__(self, name: str = "checker-judge", w: Any = world):
        super().__init__(name, w)

    def reply(self, text: str) -> str:
        m = _parts(_JUDGE_RE, text, "judging")
        ok_a, ok_b = self.world.correct(m["task"], m["a"]), self.world.correct(m["task"], m["b"])
        verdict = "B" if ok_b and not ok_a else "A"
        why = "only one answer is right" if ok_a != ok_b else "no difference that matters"
        return f"{why}.\nVerdict: {verdict}"
