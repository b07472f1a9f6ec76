"""Builders of CLAIR preference pairs and of the paper's baseline datasets.

- :func:`build_clair`: y_l = the target model's answer, y_w = the reviser's minimal revision.
- :func:`build_stronger_preferred`: y_l = the target's answer, y_w = a stronger model's answer.
- :func:`build_onpolicy_judge`: two samples of the target; a judge picks the winner, shown the
  two in a random (recorded, seeded) order to cancel position bias.
- :func:`build_offpolicy_judge`: existing judged completions (UltraFeedback style) turned into
  best-versus-lower pairs; ties are rejected.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from apo_jax.clair import ledger
from apo_jax.clair.cache import user_turn
from apo_jax.clair.client import Backend, RequestError
from apo_jax.clair.ledger import BuildResult, PromptRow, Row, chat_pair
from apo_jax.clair.prompts import (
    Messages,
    ParseError,
    judge_messages,
    parse_revision,
    parse_verdict,
    revision_messages,
)
from apo_jax.data import schema


@dataclasses.dataclass
class Role:
    """A backend with the sampling parameters it is called with (temperature, max_tokens ...)."""

    backend: Backend
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.backend.model

    def complete(self, messages_list: Sequence[Messages], **overrides: Any) -> list[Any]:
        """Calls the backend with this role's parameters, updated by ``overrides``."""
        return self.backend.complete(list(messages_list), {**self.params, **overrides})


def _problem(reply: Any) -> tuple[str, str] | None:
    """(reason, detail) when a reply is unusable."""
    if isinstance(reply, RequestError):
        return ledger.REQUEST_FAILED, str(reply)
    if not isinstance(reply, str) or not reply.strip():
        return ledger.EMPTY_ANSWER, ""
    return None


def _answers(rows: list[PromptRow], role: Role, who: str, result: BuildResult, **kw: Any):
    """The role's answers to the rows' prompts; failed or empty ones are rejected."""
    replies = role.complete([user_turn(r.prompt) for r in rows], **kw)
    good = []
    for row, reply in zip(rows, replies, strict=True):
        problem = _problem(reply)
        if problem:
            result.reject(row.line, row.record, problem[0], who, problem[1])
        else:
            good.append((row, reply))
    return good


def build_clair(
    rows: list[PromptRow],
    target: Role,
    reviser: Role,
    result: BuildResult,
    *,
    keep_identical: bool = False,
) -> BuildResult:
    """Builds CLAIR pairs: the reviser minimally revises each target answer.

    Args:
      rows: prompts read from the input.
      target: the model being aligned; its answer is the rejected side y_l.
      reviser: the stronger model; its parsed corrected answer is the chosen side y_w.
      result: ledger that receives pairs and rejects.
      keep_identical: keep pairs whose revision equals the answer (no training signal).

    Returns:
      ``result``.
    """
    answered = _answers(rows, target, "target", result)
    replies = reviser.complete([revision_messages(row.prompt, ans) for row, ans in answered])
    for (row, answer), reply in zip(answered, replies, strict=True):
        if isinstance(reply, RequestError):
            result.reject(row.line, row.record, ledger.REQUEST_FAILED, "reviser", str(reply))
            continue
        try:
            revision = parse_revision(reply)
        except ParseError as err:
            result.reject(row.line, row.record, err.reason, "reviser", str(err), reply=reply)
            continue
        if revision.answer.strip() == answer.strip() and not keep_identical:
            result.reject(row.line, row.record, ledger.UNCHANGED_REVISION, "reviser")
            continue
        pair = chat_pair(
            row.prompt,
            revision.answer,
            answer,
            reviser_reasoning=revision.reasoning,
            target_model=target.model,
            reviser_model=reviser.model,
            method="clair",
        )
        result.add(row.line, pair)
    return result


def build_stronger_preferred(
    rows: list[PromptRow], target: Role, stronger: Role, result: BuildResult
) -> BuildResult:
    """Builds pairs whose winner is the stronger model's own answer to the prompt."""
    answered = _answers(rows, target, "target", result)
    strong = {
        r.line: a for r, a in _answers([r for r, _ in answered], stronger, "stronger", result)
    }
    for row, answer in answered:
        if row.line not in strong:
            continue
        if strong[row.line].strip() == answer.strip():
            result.reject(row.line, row.record, ledger.IDENTICAL_ANSWERS, "stronger")
            continue
        pair = chat_pair(
            row.prompt,
            strong[row.line],
            answer,
            target_model=target.model,
            stronger_model=stronger.model,
            method="stronger_preferred",
        )
        result.add(row.line, pair)
    return result


def build_onpolicy_judge(
    rows: list[PromptRow], target: Role, judge: Role, result: BuildResult, *, seed: int = 0
) -> BuildResult:
    """Builds pairs from two target samples judged pairwise, in a random recorded order."""
    base = int(target.params.get("seed", seed))
    first = {r.line: a for r, a in _answers(rows, target, "target", result, seed=base)}
    again = [r for r in rows if r.line in first]
    second = {r.line: a for r, a in _answers(again, target, "target", result, seed=base + 1)}
    judged = []
    for row in again:
        if row.line not in second:
            continue
        samples = (first[row.line], second[row.line])
        if samples[0].strip() == samples[1].strip():
            result.reject(row.line, row.record, ledger.IDENTICAL_ANSWERS, "target", "two samples")
            continue
        swap = random.Random(f"{seed}:{row.line}").random() < 0.5
        judged.append((row, samples, (1, 0) if swap else (0, 1)))
    msgs = [judge_messages(row.prompt, s[o[0]], s[o[1]]) for row, s, o in judged]
    for (row, samples, order), reply in zip(judged, judge.complete(msgs), strict=True):
        _judged_pair(row, samples, order, reply, target, judge, result)
    return result


def _judged_pair(row, samples, order, reply, target: Role, judge: Role, result: BuildResult):
    shown = [f"sample_{i}" for i in order]
    if isinstance(reply, RequestError):
        result.reject(row.line, row.record, ledger.REQUEST_FAILED, "judge", str(reply))
        return
    try:
        verdict = parse_verdict(reply)
    except ParseError as err:
        result.reject(
            row.line, row.record, err.reason, "judge", str(err), reply=reply, judge_order=shown
        )
        return
    if verdict == "tie":
        result.reject(
            row.line, row.record, ledger.JUDGE_TIE, "judge", reply=reply, judge_order=shown
        )
        return
    winner = order[0] if verdict == "A" else order[1]
    pair = chat_pair(
        row.prompt,
        samples[winner],
        samples[1 - winner],
        target_model=target.model,
        judge_model=judge.model,
        judge_order=shown,
        judge_verdict=verdict,
        judge_reasoning=reply,
        method="onpolicy_judge",
    )
    result.add(row.line, pair)


def completion_score(completion: Mapping[str, Any]) -> float | None:
    """The overall score of a judged completion: ``overall_score``, else the mean rating.

    ``ratings`` (or UltraFeedback's ``annotations``) may be a number, a list, or a dict of
    aspect -> number, numeric string, or ``{"Rating": "4", ...}``; "N/A" entries are skipped.
    """
    for name in ("overall_score", "score"):
        score = _number(completion.get(name))
        if score is not None:
            return score
    ratings = completion.get("ratings", completion.get("annotations"))
    if isinstance(ratings, Mapping):
        ratings = list(ratings.values())
    if not isinstance(ratings, list):
        return _number(ratings)
    values = [_number(v.get("Rating") if isinstance(v, Mapping) else v) for v in ratings]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def build_offpolicy_judge(rows: list[Row], result: BuildResult, *, seed: int = 0) -> BuildResult:
    """Turns judged completions into pairs: the best one versus a random strictly lower one."""
    for row in rows:
        prompt = row.record.get("prompt", row.record.get("instruction"))
        if not isinstance(prompt, str) or not prompt.strip():
            reason = schema.MISSING_FIELD if prompt is None else schema.EMPTY_PROMPT
            result.reject(row.line, row.record, reason, "input", "field 'prompt' or 'instruction'")
            continue
        scored = []
        for c in row.record.get("completions") or []:
            text = c.get("response") if isinstance(c, Mapping) else None
            score = completion_score(c) if isinstance(text, str) and text.strip() else None
            if score is not None:
                scored.append((score, text, c.get("model")))
        if len(scored) < 2:
            why = "fewer than 2 completions with a response and a score in field 'completions'"
            result.reject(row.line, row.record, ledger.TOO_FEW_SCORED, "input", why)
            continue
        best = max(scored, key=lambda s: s[0])
        lower = [s for s in scored if s[0] < best[0] and s[1].strip() != best[1].strip()]
        if not lower:
            why = "no completion scores below the best"
            result.reject(row.line, row.record, ledger.SCORE_TIE, "judge", why)
            continue
        worse = random.Random(f"{seed}:{row.line}").choice(lower)
        pair = chat_pair(
            prompt,
            best[1],
            worse[1],
            chosen_score=best[0],
            rejected_score=worse[0],
            chosen_model=best[2],
            rejected_model=worse[2],
            method="offpolicy_judge",
        )
        result.add(row.line, pair)
    return result
