"""Contrastiveness statistics of preference pairs: token-level Jaccard and character Levenshtein.

Jaccard similarity is over *sets* of tokens (|A & B| / |A | B|), as in the APO/CLAIR paper's
token-level measure. Which tokens: tokenizer token ids when a tokenizer is known (prepared shard
dirs, or ``--tokenizer``), else word tokens (``\\w+`` runs and single punctuation marks). The
Levenshtein distance is the character-level edit distance (rapidfuzz) between the two answers.

Run: ``python -m apo_jax.data.stats PATH [--tokenizer DIR] [--out DIR]``.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def word_tokens(text: str) -> list[str]:
    """Splits text into word tokens: runs of word characters and single punctuation marks."""
    return _WORD.findall(text)


def jaccard(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Returns |set(a) & set(b)| / |set(a) | set(b)| (1.0 when both are empty)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def levenshtein(a: str | Sequence[Hashable], b: str | Sequence[Hashable]) -> int:
    """Returns the edit distance (insert/delete/substitute, cost 1) between two strings or sequences."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Returns count, mean, min, max and quantiles of a list of numbers (None fields when empty)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"count": 0, "mean": None, "min": None, "max": None}
    out: dict[str, Any] = {
        "count": int(x.size),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
    }
    for q, v in zip(QUANTILES, np.quantile(x, QUANTILES), strict=True):
        out["median" if q == 0.5 else f"p{round(q * 100)}"] = float(v)
    return out
