"""Scores of generations: checkers for verifiable tasks and bootstrap confidence intervals.

A checker is any function ``fn(row, response) -> bool`` named on the command line as
``module:function``; ``row`` is the input row as read (so it sees fields such as ``answer``).
Accuracy is the mean of ``correct`` over every generated response, with a 95% percentile
bootstrap interval (resampling responses, 1000 resamples, fixed seed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from apo_jax.errors import UserError

Checker = Callable[[Mapping[str, Any], str], Any]
RESAMPLES = 1000


class CheckerError(UserError):
    """A checker that cannot be loaded, raised on a row, or returned a non-boolean."""


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap interval of the mean of `values`.

    Args:
      values: per-item scores (e.g. 1.0/0.0 correctness, or 1/0.5/0 pair outcomes).
      resamples: bootstrap resamples.
      seed: resampling seed (fixed, so a rerun reports the same interval).
      level: coverage of the interval.

    Returns:
      [low, high], or None when `values` is empty.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def load_checker(spec: str) -> Checker:
    """Imports ``module:function``.

    Raises:
      CheckerError: naming the spec and what is wrong with it.
    """
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise CheckerError(
            f"--checker={spec!r}: write it as module:function, e.g. apo_jax.eval.checkers:demo"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckerError(f"--checker={spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CheckerError(f"--checker={spec!r}: {module_name} has no function {fn_name!r}")
    return fn


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating) and value in (0, 1):
        return bool(value)
    return None


def apply_checker(
    fn: Checker, rows: list[dict[str, Any]], records: Sequence[Mapping[str, Any]], name: str = ""
) -> None:
    """Sets ``row["correct"]`` for every row from ``fn(record, row["response"])``.

    Raises:
      CheckerError: when the checker raises or returns something other than a boolean (or 0/1);
        the message names the row, so a fixed checker can be rerun on the saved generations.
    """
    label = name or getattr(fn, "__name__", "checker")
    for row, record in zip(rows, records, strict=True):
        try:
            value = fn(record, row["response"])
        except Exception as e:
            raise CheckerError(
                f"checker {label} raised on id {row['id']!r}: {type(e).__name__}: {e}"
            ) from None
        ok = _as_bool(value)
        if ok is None:
            raise CheckerError(
                f"checker {label} returned {value!r} for id {row['id']!r}; it must return a bool"
            )
        row["correct"] = ok


def accuracy(rows: Sequence[Mapping[str, Any]], name: str = "") -> dict[str, Any]:
    """summary.json's checker block: accuracy, its 95% interval, counts."""
    correct = [1.0 if r["correct"] else 0.0 for r in rows]
    return {
        "checker": name,
        "count": len(correct),
        "correct": int(sum(correct)),
        "accuracy": float(np.mean(correct)) if correct else None,
        "ci95": bootstrap_ci(correct),
    }
