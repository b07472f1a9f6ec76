"""Pairwise judge win rate against a baseline's generations, through an OpenAI-compatible judge.

Every prompt answered by both sides (matched by ``id``) is judged twice, once with our response
in position A and once in position B, so a judge that prefers a position cancels out. A verdict is
``[[A]]``, ``[[B]]`` or ``[[TIE]]`` (the parser also reads ``A>B``-style labels and "Verdict: B"
lines, and takes the last verdict in a reply). Each order scores our response 1 (win), 0.5 (tie)
or 0 (loss); a pair's score is the mean of its readable orders, and the win rate is the mean over
scored pairs with a 95% bootstrap interval over pairs. Both sides' mean response lengths are
reported next to it, because judges favour longer answers.

Requests go through the project's chat client (retries, rate limit, a resumable cache at
``<out>/judge_cache.jsonl``); ``<out>/judgments.jsonl`` keeps each pair's verdicts and replies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from apo_jax.clair import cache as clair_cache
from apo_jax.clair import client as clair_client
from apo_jax.clair import keys
from apo_jax.errors import UserError
from apo_jax.eval.prompts import Example
from apo_jax.eval.scoring import bootstrap_ci

SYSTEM = (
    "You are judging two replies written by AI assistants to the same request. Decide which "
    "reply serves the person better: correct, complete for what was asked, clear, and no "
    "longer than it needs to be. A reply is not better for being longer, and the order in "
    "which the replies are shown means nothing. Give a short justification, then finish with "
    "the verdict alone on the last line: [[A]] when reply A is better, [[B]] when reply B is "
    "better, [[TIE]] when neither is better."
)
TEMPLATE = (
    "<request>\n{question}\n</request>\n\n<reply A>\n{a}\n</reply A>\n\n<reply B>\n{b}\n</reply B>"
)
_BRACKETED = re.compile(r"\[\[\s*([AB]\s*(?:>>|>|=|<<|<)\s*[AB]|A|B|C|TIE|EQUAL|DRAW)\s*\]\]", re.I)
_LINE = re.compile(
    r"verdict\s*(?:is)?\s*[:\-]?\s*[*_`\"']*\s*(?:reply\s+|response\s+|assistant\s+)?(A|B|tie)\b",
    re.I,
)


class JudgeError(UserError):
    """Judge settings or a baseline file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """The judge endpoint and the baseline (the command's --judge_* flags)."""

    baseline: str  # the baseline's generations.jsonl
    url: str  # OpenAI-compatible base URL, e.g. http://localhost:8000/v1
    model: str  # judge model name
    api_key_env: str = ""  # read the key from this variable ("" = send none); never written
    concurrency: int = 8
    max_tokens: int = 1024
    rpm: float | None = None
    baseline_name: str = "baseline"
    max_retries: int = 6
    backoff_base: float = 1.0


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie', or None when the reply holds no readable verdict (the last one wins)."""
    hits = _BRACKETED.findall(text)
    if hits:
        label = re.sub(r"\s+", "", hits[-1]).upper()
        if label in ("A", "B"):
            return label
        if label in ("C", "TIE", "EQUAL", "DRAW") or "=" in label:
            return "tie"
        first, op = label[0], label[1]  # 'A>B', 'B>>A', 'A<B'
        return first if op == ">" else ("B" if first == "A" else "A")
    hits = _LINE.findall(text)
    if hits:
        return hits[-1].upper() if hits[-1].upper() in ("A", "B") else "tie"
    return None


def question_text(ex: Example) -> str:
    """The request as the judge sees it: the user's text, or the conversation turn by turn."""
    if len(ex.messages) == 1:
        return ex.messages[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in ex.messages)


def read_baseline(path: str) -> tuple[dict[str, dict[str, Any]], int]:
    """The baseline's rows by str(id) (first of each id), and how many lines were unusable."""
    if not os.path.exists(path):
        raise JudgeError(f"--judge_baseline={path}: no such file")
    rows, bad = {}, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, response = str(row["id"]), row["response"]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if not isinstance(response, str) or key in rows or row.get("sample", 0) != 0:
                bad += 1
                continue
            rows[key] = row
    return rows, bad


def _score(verdict: str | None, ours_is_a: bool) -> float | None:
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == ours_is_a else 0.0


def _lengths(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    tokens = [r.get("num_tokens") for r in rows]
    return {
        "chars": float(np.mean([len(r["response"]) for r in rows])) if rows else None,
        "tokens": float(np.mean(tokens))
        if rows and all(isinstance(t, int) for t in tokens)
        else None,
    }


def check(s: JudgeSettings) -> None:
    """Raises JudgeError before any generation when the judge settings cannot work."""
    if not s.url or not s.model:
        raise JudgeError("--judge_baseline needs --judge_url and --judge_model")
    if not os.path.exists(s.baseline):
        raise JudgeError(f"--judge_baseline={s.baseline}: no such file")
    if s.api_key_env:
        keys.read_key(s.api_key_env)  # a missing key fails now, not after the generation
    keys.check_endpoint(s.url, key_env=s.api_key_env or None)


def _backend(s: JudgeSettings, out: str) -> clair_client.OpenAIChatBackend:
    check(s)
    env = s.api_key_env or None
    redact = keys.Redactor({env: os.environ.get(env, "")} if env else {})
    return clair_client.OpenAIChatBackend(
        s.url,
        s.model,
        api_key_env=env,
        cache=clair_cache.RequestCache(os.path.join(out, "judge_cache.jsonl"), redact=redact),
        concurrency=s.concurrency,
        rpm=s.rpm,
        max_retries=s.max_retries,
        backoff_base=s.backoff_base,
        progress=False,
    )


def _chats(pairs: Sequence[tuple[Example, dict, dict]]) -> list[list[dict[str, str]]]:
    """Two chats per pair: our response as reply A, then as reply B."""
    chats = []
    for ex, mine, base in pairs:
        q = question_text(ex)
        for a, b in ((mine, base), (base, mine)):
            user = TEMPLATE.format(question=q, a=a["response"], b=b["response"])
            chats.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    return chats


def _judge_pair(row_id: Any, replies: Sequence[Any]) -> dict[str, Any]:
    """A judgments.jsonl record from a pair's two replies (ours first, then baseline first)."""
    orders = {}
    for name, reply, ours_is_a in (
        ("ours_first", replies[0], True),
        ("baseline_first", replies[1], False),
    ):
        if isinstance(reply, clair_client.RequestError):
            orders[name] = {"verdict": None, "score": None, "error": str(reply)}
        else:
            verdict = parse_verdict(reply)
            orders[name] = {"verdict": verdict, "score": _score(verdict, ours_is_a), "reply": reply}
    got = [o["score"] for o in orders.values() if o["score"] is not None]
    return {"id": row_id, "score": float(np.mean(got)) if got else None, **orders}


def _tally(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Win rate, interval, outcome counts and position statistics of the judged pairs."""
    scores = [r["score"] for r in records if r["score"] is not None]
    orders = [r[k] for r in records for k in ("ours_first", "baseline_first")]
    verdicts = [o["verdict"] for o in orders if o["verdict"] in ("A", "B")]
    both = [
        r for r in records if None not in (r["ours_first"]["score"], r["baseline_first"]["score"])
    ]
    return {
        "pairs_scored": len(scores),
        "requests_failed": sum("error" in o for o in orders),
        "replies_unparsed": sum("reply" in o and o["verdict"] is None for o in orders),
        "wins": sum(x > 0.5 for x in scores),
        "ties": sum(x == 0.5 for x in scores),
        "losses": sum(x < 0.5 for x in scores),
        "win_rate": float(np.mean(scores)) if scores else None,
        "ci95": bootstrap_ci(scores),
        "orders_agree": float(
            np.mean([r["ours_first"]["score"] == r["baseline_first"]["score"] for r in both])
        )
        if both
        else None,
        "first_position_picked": float(np.mean([v == "A" for v in verdicts])) if verdicts else None,
    }


def run(
    s: JudgeSettings, out: str, examples: Sequence[Example], rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Judges our `rows` (aligned with `examples`) against the baseline; returns summary.json's block.

    Args:
      s: JudgeSettings.
      out: the output directory (judgments.jsonl and the request cache go there).
      examples: the prompt rows, one per entry of `rows` (first sample only is judged).
      rows: our generations.

    Returns:
      Win rate, its interval, counts, position statistics and both sides' mean lengths.
    """
    baseline, unreadable = read_baseline(s.baseline)
    ours = [(ex, r) for ex, r in zip(examples, rows, strict=True) if r.get("sample", 0) == 0]
    pairs = [(ex, r, baseline[str(r["id"])]) for ex, r in ours if str(r["id"]) in baseline]
    chats = _chats(pairs)
    backend = _backend(s, out)
    try:
        params = {"temperature": 0.0, "max_tokens": s.max_tokens}
        replies = backend.complete(chats, params) if chats else []
    finally:
        backend.cache.close()
    records = [
        _judge_pair(m["id"], replies[2 * n : 2 * n + 2]) for n, (_, m, _) in enumerate(pairs)
    ]
    path = os.path.join(out, "judgments.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".tmp", path)
    return {
        "judge_model": s.model,
        "judge_url": s.url,
        "baseline": os.path.abspath(s.baseline),
        "baseline_name": s.baseline_name,
        "pairs": len(pairs),
        "unmatched_ours": len(ours) - len(pairs),
        "unmatched_baseline": len(baseline) - len(pairs),
        "baseline_lines_unusable": unreadable,
        **_tally(records),
        "mean_length": {
            "ours": _lengths([m for _, m, _ in pairs]),
            s.baseline_name: _lengths([b for _, _, b in pairs]),
        },
        "requests": backend.usage.summary(),
    }
