"""The 'unpaired' layout: single completions labelled desirable or undesirable (TRL's KTO data).

A batch of N unpaired records (:class:`UnpairedRecord`, as ``apo_jax.data.shards`` stores them)
is laid out as concat lays pairs: rows ``0..N-1`` prompt + completion, rows ``N..2N-1`` prompt +
KL completion (the mismatched pair whose log-ratio enters the batch's KL estimate), plus
``label bool[N]``:

  ``input_ids, completion_mask, positions, segment_ids: int32[2N, T]``, ``label: bool[N]``

With ``kl=False`` (the ``apo_zero_unpaired`` loss needs no KL estimate) only the N completion
rows are written and run; concat's batch splitting then treats them as one block of rows. :meth:`pair_logps` returns the completions' log-probs as ``chosen`` and
the KL completions' as ``rejected`` (0 without KL rows); the train step turns them into
:class:`apo_jax.losses.UnpairedLogps`. Stored reference log-probs of unpaired shards hold the
same two numbers per record (the reference pass reads the records as pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from apo_jax.layouts import base, concat


class UnpairedDataError(base.LayoutError):
    """Shards of pairs given to an unpaired loss (or the other way round)."""


class UnpairedRecord(base.Record, Protocol):
    """What the layout reads of an unpaired record (``kind == 'unpaired'``)."""

    completion: np.ndarray  # int32[C]
    kl_completion: np.ndarray  # int32[K]
    label: bool  # True: desirable


@dataclasses.dataclass(frozen=True)
class Unpaired(concat.Concat):
    """Completion rows, then KL rows, and the labels (see the module docstring)."""

    name = "unpaired"
    kl: bool = True  # write and run the KL rows

    def collate(
        self, records: Sequence[UnpairedRecord | None], spec: base.RowSpec
    ) -> dict[str, np.ndarray]:
        """2N rows (N without KL rows) and ``label``; padding examples are undesirable rows
        without tokens, which the loss masks out."""
        for r in records:
            if r is not None and r.kind != "unpaired":
                raise UnpairedDataError(
                    "an unpaired loss got shards of pairs: prepare rows with prompt, completion "
                    "and label fields (python -m apo_jax.data.prepare), or use a pair loss"
                )
        sides = [(r.prompt, r.completion) if r else None for r in records]
        if self.kl:
            sides += [(r.prompt, r.kl_completion) if r else None for r in records]
        batch = concat.sequence_rows(sides, spec)
        batch["label"] = np.array([bool(r is not None and r.label) for r in records], bool)
        return batch

    @property
    def rows_per_pair(self) -> int:  # type: ignore[override]
        """Rows per example that the mesh must divide: 2 with KL rows, else 1."""
        return 2 if self.kl else 1

    def pair_logps(
        self, graphdef: Any, params: Any, batch: base.Batch, chunk: int
    ) -> base.SideLogps:
        """Completion log-probs as ``chosen``, KL-completion ones as ``rejected`` (0 without)."""
        if self.kl:
            return super().pair_logps(graphdef, params, batch, chunk)
        logps_N, counts_N = concat.row_logps(graphdef, params, batch, chunk)
        zeros_N = jnp.zeros_like(logps_N)
        return base.SideLogps(logps_N, zeros_N, counts_N, zeros_N)
