"""The 'prefix' layout (prompt-prefix sharing): prompt, chosen and rejected in one row.

One row per pair, ``prompt + chosen + rejected``, right-padded to ``T``:

  ``input_ids, chosen_mask, rejected_mask, positions, segment_ids, branch_ids: int32[N, T]``,
  ``prompt_length, chosen_length: int32[N]``

``branch_ids`` are 0 on the prompt, 1 on chosen, 2 on rejected; the rejected positions restart at
the prompt's end. :func:`attention_mask` lets each completion attend to the prompt and to itself
only, so every completion token sees exactly the keys, values and RoPE phases it sees in the
'concat' layout, while the prompt's tokens run once per pair instead of twice: the saving when
prompts are long.

The one token that needs care is the first rejected token: in the row it follows the last chosen
token, but it is predicted from the prompt's last hidden state. :meth:`Prefix.pair_logps` reads
that state from position ``prompt_length - 1`` in place of the (otherwise unused) last chosen
state (:func:`predictor_index`).

``T`` defaults to the shards' longest prefix row rounded up to 64. Globally the processes' rows
follow each other; a micro-batch is a slice of consecutive pairs, whose ``N/k`` rows must split
over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax.layouts import base
from apo_jax.logprobs import segment_logps


@dataclasses.dataclass(frozen=True)
class Prefix(base.Layout):
    """Prompt, chosen and rejected in one row (see the module docstring)."""

    name = "prefix"
    length_key = "prefix_row"

    def collate(
        self, records: Sequence[base.Record | None], spec: base.RowSpec
    ) -> dict[str, np.ndarray]:
        """N rows of prompt + chosen + rejected, with branch ids and the prompt/chosen lengths."""
        n = len(records)
        needed = max(
            [len(r.prompt) + len(r.chosen) + len(r.rejected) for r in records if r], default=1
        )
        t = base.pick_length(needed, spec.seq_len, spec.buckets)
        out = {
            k: np.zeros((n, t), np.int32)
            for k in ("chosen_mask", "rejected_mask", "positions", "segment_ids", "branch_ids")
        }
        out["input_ids"] = np.full((n, t), spec.pad_id, np.int32)
        out["prompt_length"] = np.zeros(n, np.int32)
        out["chosen_length"] = np.zeros(n, np.int32)
        for row, r in enumerate(records):
            if r is None:
                continue
            p, c, j = len(r.prompt), len(r.chosen), len(r.rejected)
            L = p + c + j
            out["input_ids"][row, :L] = np.concatenate([r.prompt, r.chosen, r.rejected])
            out["chosen_mask"][row, p : p + c] = 1
            out["rejected_mask"][row, p + c : L] = 1
            out["branch_ids"][row, p : p + c], out["branch_ids"][row, p + c : L] = 1, 2
            out["positions"][row, : p + c] = np.arange(p + c)
            out["positions"][row, p + c : L] = np.arange(p, p + j)
            out["segment_ids"][row, :L] = 1
            out["prompt_length"][row], out["chosen_length"][row] = p, c
        return out

    def default_seq_len(self, manifest: Mapping[str, Any]) -> int:
        """The shards' longest prefix row (else twice ``max_length``), rounded up to 64."""
        longest = (
            manifest["lengths"].get("prefix_row", {}).get("max")
            or 2 * manifest["settings"]["max_length"]
        )
        return int(math.ceil(longest / 64) * 64)

    def pair_logps(
        self, graphdef: Any, params: Any, batch: base.Batch, chunk: int
    ) -> base.SideLogps:
        """Log-probs and token counts of the N pairs, one row each."""
        model = nnx.merge(graphdef, params)
        ids_NxT = batch["input_ids"]
        mask_NxTxT = attention_mask(batch["branch_ids"], batch["segment_ids"])
        hidden_NxTxD = model(
            ids_NxT,
            positions_BxT=batch["positions"],
            attn_mask_BxTxT=mask_NxTxT,
            return_hidden=True,
        )
        src_NxT = predictor_index(batch["prompt_length"], batch["chosen_length"], ids_NxT.shape[1])
        hidden_NxTxD = jnp.take_along_axis(hidden_NxTxD, src_NxT[:, :, None], axis=1)
        masks_2xNxT = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]])
        logps_2xN, counts_2xN = segment_logps(
            hidden_NxTxD, model.unembedding(), ids_NxT, masks_2xNxT, chunk_size=chunk
        )
        return base.SideLogps(logps_2xN[0], logps_2xN[1], counts_2xN[0], counts_2xN[1])


def attention_mask(branch_ids_NxT: Any, segment_ids_NxT: Any) -> Any:
    """Returns the bool ``[N, T, T]`` mask (True = query may attend key) of prefix rows.

    mask[q, k] = k <= q  and  segment[q] == segment[k]  and  (branch[k] == 0 or branch[k] == branch[q]):
    the prompt is seen by both completions, a completion never sees the other one, and padding
    (segment 0) only sees padding. Works on numpy and on jax arrays.
    """
    xp = np if isinstance(branch_ids_NxT, np.ndarray) else jnp
    t = branch_ids_NxT.shape[-1]
    causal_TxT = xp.tril(xp.ones((t, t), dtype=bool))
    bq, bk = branch_ids_NxT[:, :, None], branch_ids_NxT[:, None, :]
    same_segment = segment_ids_NxT[:, :, None] == segment_ids_NxT[:, None, :]
    return causal_TxT[None] & same_segment & ((bk == 0) | (bk == bq))


def predictor_index(prompt_length_N: jax.Array, chosen_length_N: jax.Array, t: int) -> jax.Array:
    """Index [N, T] of the hidden state each position's successor is predicted from.

    Identity, except that the last chosen position ``p + c - 1`` (whose own prediction would be the
    first rejected token, across the branch boundary) reads the prompt's last state ``p - 1``.
    """
    t_1xT = jnp.arange(t, dtype=jnp.int32)[None, :]
    p_Nx1, c_Nx1 = prompt_length_N[:, None], chosen_length_N[:, None]
    boundary = (t_1xT == p_Nx1 + c_Nx1 - 1) & (p_Nx1 > 0)
    return jnp.where(boundary, p_Nx1 - 1, t_1xT)
