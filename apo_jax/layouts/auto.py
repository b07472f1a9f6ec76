"""``config.data.layout=auto``: the row layout chosen from the data's lengths and the run's settings.

Every layout gives the same losses and gradients for the same pairs, so the choice is only about
speed: the work a layout spends per pair. From the shards' manifest (``lengths``: prompt, chosen,
rejected, ``row_max``, ``prefix_row``; ``settings.max_length``) each candidate gets an estimate
of its rows per pair and their length ``T``, costed like the decoder: per row ``T`` tokens of
matmuls plus causal attention over ``T^2 / 2`` scores (the model's dims weigh the two):

- ``concat``: 2 rows per pair of the concat row length (``seq_len``, or the bucket that holds the
  90th percentile of ``row_max``).
- ``prefix``: 1 row per pair of the prefix row length (``seq_len`` when given, else the longest
  prefix row rounded up to 64); only when that row holds every pair's prompt + chosen + rejected.
- ``packed``: the mean tokens of a micro-batch's 2N sequences packed into rows of the concat row
  length at 95% fill, rounded up as :func:`apo_jax.layouts.packed.row_count` does.
- ``packed_prefix``: the mean prefix rows of a micro-batch's N pairs packed the same way into rows
  of the prefix row length; only when that row holds every pair's prefix row.

A layout the other settings rule out (its ``check`` against batch size, ``grad_accum`` and the
mesh fails) is skipped. ``concat`` stays unless another is at least :data:`MARGIN` cheaper: its
rows need no attention mask (plain causal attention, cuDNN's fastest kind) and one compiled shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from apo_jax.layouts import base
from apo_jax.layouts.packed import row_count

MARGIN = 0.10  # a layout other than concat must be this much cheaper to be chosen
PACK_FILL = 0.95  # tokens of a packed row that first-fit decreasing fills, estimated


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen layout, the estimates behind it, and one line that says why."""

    name: str
    costs: dict[str, float]  # estimated cost per pair of each candidate, relative to concat
    reason: str


def _cost(rows: float, t: int, attn_weight: float) -> float:
    return rows * (t + attn_weight * t * t / 2)


def _attn_weight(model_cfg: Any) -> float:
    """One attention score's cost in tokens of matmuls: 4 H Dh FLOPs per score (QK^T and PV)
    against 2 FLOPs per matmul parameter of a layer per token."""
    if model_cfg is None:
        return 0.0
    D, H, K, Dh, F = (
        model_cfg.d_model,
        model_cfg.n_heads,
        model_cfg.n_kv_heads,
        model_cfg.head_dim,
        model_cfg.mlp_dim,
    )
    matmul_params = D * Dh * (2 * H + 2 * K) + 3 * D * F
    return 4 * H * Dh / (2 * matmul_params)


def _bucket(needed: float, seq_len: int, buckets: Sequence[int] | None) -> int:
    return next((b for b in sorted(buckets or ()) if b >= needed), seq_len)


def choose(
    manifest: Mapping[str, Any],
    *,
    seq_len: int | None,
    buckets: Sequence[int] | None,
    batch_size: int,
    grad_accum: int,
    data_ways: int,
    process_count: int,
    model_cfg: Any = None,
) -> Choice:
    """Picks concat, prefix, packed or packed_prefix for shards with this manifest and these run settings.

    Args:
      manifest: the train shards' manifest (``lengths`` and ``settings.max_length``).
      seq_len: ``config.data.seq_len`` (None: the layout's default from the manifest).
      buckets: ``config.data.buckets`` or None.
      batch_size, grad_accum: pairs per step (all processes) and micro-batches per step.
      data_ways: the mesh's ``data * fsdp``.
      process_count: processes.
      model_cfg: the model's ``LlamaConfig`` (weighs attention against matmuls); None: tokens only.

    Returns:
      The :class:`Choice`. Concat when the manifest has no lengths.
    """
    from apo_jax import layouts

    lengths = manifest.get("lengths") or {}
    row, pre = lengths.get("row_max") or {}, lengths.get("prefix_row") or {}
    seqs = [lengths.get(k, {}).get("mean") for k in ("prompt", "chosen", "rejected")]
    if row.get("max") is None or None in seqs:
        return Choice("concat", {"concat": 1.0}, "the shards' manifest gives no row lengths")
    t_concat = seq_len or layouts.get("concat").default_seq_len(manifest)
    t_concat = _bucket(row.get("p90", row["max"]), t_concat, buckets)
    w = _attn_weight(model_cfg)
    costs = {"concat": _cost(2, t_concat, w)}
    skipped = []
    for name in ("packed", "prefix", "packed_prefix"):  # on a tie the first wins
        try:
            layouts.get(name).check(
                batch_size=batch_size,
                grad_accum=grad_accum,
                data_ways=data_ways,
                process_count=process_count,
            )
        except base.LayoutError:
            skipped.append(f"{name} (batch/mesh)")
            continue
        m = batch_size // process_count // grad_accum  # pairs of a micro-batch, packed together
        if name in ("prefix", "packed_prefix"):
            t = seq_len or layouts.get(name).default_seq_len(manifest)
            if pre.get("max") is None or pre["max"] > t:
                skipped.append(f"{name} (rows of {pre.get('max')} > seq_len {t})")
                continue
            if name == "prefix":
                costs[name] = _cost(1, _bucket(pre.get("p90", pre["max"]), t, buckets), w)
            else:  # whole prefix rows packed into rows of t
                used = math.ceil(m * pre.get("mean", pre["max"]) / (PACK_FILL * t))
                costs[name] = _cost(row_count(used, m, 1) / m, t, w)
        else:
            seq_tokens = 2 * seqs[0] + seqs[1] + seqs[2]  # a pair's two sequences, on average
            used = math.ceil(m * seq_tokens / (PACK_FILL * t_concat))
            costs[name] = _cost(row_count(used, 2 * m, 1) / m, t_concat, w)
    best = min(costs, key=costs.get)
    if best != "concat" and costs[best] > (1 - MARGIN) * costs["concat"]:
        best = "concat"
    rel = {k: v / costs["concat"] for k, v in costs.items()}
    est = ", ".join(f"{k} {v:.2f}" for k, v in rel.items())
    why = (
        f"estimated work per pair relative to concat: {est} (mean prompt {seqs[0]:.0f}, "
        f"chosen {seqs[1]:.0f}, rejected {seqs[2]:.0f} tokens; rows of {t_concat})"
    )
    if skipped:
        why += "; not possible: " + ", ".join(skipped)
    return Choice(best, rel, why)
