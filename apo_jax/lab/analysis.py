"""Accuracy with 95% intervals over seeds and prompts, changes from the target, and the verdicts
on the paper's two claims.

A condition's results are a 0/1 matrix, seeds x held-out prompts. Its interval is a two-way
percentile bootstrap: each resample draws seeds (rows) and prompts (columns) with replacement.
A difference between two conditions draws the prompts once for both (they answer the same
prompts) and each condition's seeds on their own (seeds are not paired across conditions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _draw(rng: np.random.Generator, m_SxP: np.ndarray, p_idx: np.ndarray) -> float:
    s_idx = rng.integers(0, m_SxP.shape[0], m_SxP.shape[0])
    return float(m_SxP[s_idx].mean(axis=0)[p_idx].mean())


def interval(
    m_SxP: np.ndarray, base_SxP: np.ndarray | None = None, *, seed: int = 0
) -> list[float]:
    """95% bootstrap interval of mean(m), or of mean(m) - mean(base) when `base` is given."""
    rng = np.random.default_rng(seed)
    P = m_SxP.shape[1]
    values = np.empty(RESAMPLES)
    for r in range(RESAMPLES):
        p_idx = rng.integers(0, P, P)
        values[r] = _draw(rng, m_SxP, p_idx) - (
            _draw(rng, base_SxP, p_idx) if base_SxP is not None else 0.0
        )
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def summary(m_SxP: np.ndarray, base_SxP: np.ndarray) -> dict[str, Any]:
    """Mean accuracy and interval, and the change from the target with its interval."""
    delta_ci = interval(m_SxP, base_SxP)
    return {
        "accuracy": float(m_SxP.mean()),
        "ci95": interval(m_SxP),
        "seeds": int(m_SxP.shape[0]),
        "delta": float(m_SxP.mean() - base_SxP.mean()),
        "delta_ci95": delta_ci,
        "moved": delta_ci[0] > 0 or delta_ci[1] < 0,
    }


def compare(a_SxP: np.ndarray, b_SxP: np.ndarray) -> dict[str, Any]:
    """mean(a) - mean(b) with its interval, and its sign when the interval excludes 0."""
    ci = interval(a_SxP, b_SxP)
    sign = 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0
    return {"diff": float(a_SxP.mean() - b_SxP.mean()), "ci95": ci, "sign": sign}


def _verdict(signs: Sequence[int]) -> str:
    if not signs:
        return "inconclusive"
    if any(s < 0 for s in signs):
        return "not reproduced"
    return "reproduced" if all(s > 0 for s in signs) else "inconclusive"


def claim_contrastive(mats: Mapping[tuple[str, str], np.ndarray]) -> dict[str, Any]:
    """Claim (i): CLAIR pairs teach more than every other source (preference objectives pooled).

    Args:
      mats: (source, objective) -> seeds x prompts correctness.
    """
    objectives = sorted({o for _, o in mats if o != "sft"})
    sources = sorted({s for s, _ in mats})
    if "clair" not in sources or len(sources) < 2 or not objectives:
        return {
            "verdict": "inconclusive",
            "why": "needs CLAIR, another source and a preference objective in the grid",
            "comparisons": {},
        }

    def pooled(source: str) -> np.ndarray:
        return np.concatenate([mats[(source, o)] for o in objectives if (source, o) in mats])

    comps = {s: compare(pooled("clair"), pooled(s)) for s in sources if s != "clair"}
    return {
        "verdict": _verdict([c["sign"] for c in comps.values()]),
        "objectives": objectives,
        "comparisons": comps,
    }


def expected_apo(chosen_correct: float, target_accuracy: float) -> str:
    """The APO variant the paper prescribes: apo_zero when the chosen answers are better than the
    model's own (more often right than the target), apo_down otherwise."""
    return "apo_zero" if chosen_correct > target_accuracy else "apo_down"


def claim_anchored(
    mats: Mapping[tuple[str, str], np.ndarray], expected: Mapping[str, str]
) -> dict[str, Any]:
    """Claim (ii): the prescribed APO variant beats DPO and the other variant, sources pooled.

    Args:
      mats: (source, objective) -> seeds x prompts correctness.
      expected: source -> the prescribed variant (`expected_apo`).
    """
    other = {"apo_zero": "apo_down", "apo_down": "apo_zero"}
    comps = {}
    for rival in ("dpo", "other APO variant"):
        a, b = [], []
        for source, variant in expected.items():
            r = "dpo" if rival == "dpo" else other[variant]
            if (source, variant) in mats and (source, r) in mats:
                a.append(mats[(source, variant)])
                b.append(mats[(source, r)])
        if a:
            comps[rival] = {**compare(np.concatenate(a), np.concatenate(b)), "sources": len(a)}
    if not comps:
        return {
            "verdict": "inconclusive",
            "why": "needs the prescribed APO variant and a rival in the grid",
            "comparisons": {},
            "expected": dict(expected),
        }
    return {
        "verdict": _verdict([c["sign"] for c in comps.values()]),
        "comparisons": comps,
        "expected": dict(expected),
    }
