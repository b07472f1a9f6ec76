"""The train step on unpaired batches: the loss equals unpaired_loss of the rows' log-probs
with the batch's KL estimate; apo_zero_unpaired runs without KL rows."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax import layouts, losses
from apo_jax.data import shards
from apo_jax.layouts import concat
from apo_jax.models.llama import Llama
from apo_jax.train import train_step as ts
from tests.test_train_step import CFG


def _batch(kl=True, n=4, seed=0):
    rng = np.random.default_rng(seed)
    recs = [
        shards.UnpairedRecord(
            rng.integers(1, 64, 5).astype(np.int32),
            rng.integers(1, 64, 4 + i).astype(np.int32),
            rng.integers(1, 64, 7 - i).astype(np.int32),
            i % 2 == 0,
            i,
        )
        for i in range(n)
    ]
    layout = dataclasses.replace(layouts.get("unpaired"), kl=kl)
    batch = layout.collate(recs + [None], layouts.RowSpec(seq_len=16))
    batch["index"] = np.array([0, 1, 2, 3, -1])
    batch["ref_chosen_logps"] = rng.normal(size=n + 1).astype(np.float32) - 20
    batch["ref_rejected_logps"] = rng.normal(size=n + 1).astype(np.float32) - 20
    return layout, {k: jnp.asarray(v) for k, v in batch.items()}


def test_kto_step_loss_matches_unpaired_loss():
    layout, batch = _batch(kl=True)
    graphdef, params = ts.split_model(Llama(CFG, rngs=nnx.Rngs(0)))
    cfg = ts.StepConfig(loss="kto", beta=0.5, layout=layout, unpaired_weights=(1.0, 1.5))
    loss, m = ts.loss_fn(params, graphdef, batch, cfg)
    rows_R, _ = concat.row_logps(graphdef, params, batch, 128)
    pol, kl_pol = rows_R[:5], rows_R[5:]
    valid = np.array([True] * 4 + [False])
    ratio = np.asarray(kl_pol - batch["ref_rejected_logps"])[:4]
    kl = max(ratio.mean(), 0.0)
    want, _ = losses.unpaired_loss(
        "kto",
        losses.UnpairedLogps(pol, batch["ref_chosen_logps"], batch["label"], kl),
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=1.5,
        where=valid,
    )
    np.testing.assert_allclose(loss, np.asarray(want)[:4].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5, atol=1e-6)


def test_apo_zero_unpaired_needs_no_kl_rows():
    """apo_zero_unpaired runs without KL rows and gives the same loss as with them."""
    layout_kl, batch_kl = _batch(kl=True)
    layout, batch = _batch(kl=False)
    graphdef, params = ts.split_model(Llama(CFG, rngs=nnx.Rngs(0)))
    a, _ = ts.loss_fn(
        params, graphdef, batch, ts.StepConfig(loss="apo_zero_unpaired", layout=layout)
    )
    b, _ = ts.loss_fn(
        params, graphdef, batch_kl, ts.StepConfig(loss="apo_zero_unpaired", layout=layout_kl)
    )
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert batch["input_ids"].shape[0] == 5 and batch_kl["input_ids"].shape[0] == 10
