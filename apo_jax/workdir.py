"""`flatten`: a nested config dict as {'a.b': value}, the form config checks, figure labels and
the resume comparison (`apo_jax.train.workdir`) read a run's `config.json` in.

The workdir itself (lock, kept config, resume checks) is `apo_jax.train.workdir`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested dict, values normalised as JSON stores them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out
