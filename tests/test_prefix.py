"""Prompt-prefix sharing gives the concat layout's log-probs, losses and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_grads
from flax import nnx

from apo_jax import layouts, losses
from apo_jax.data import loader, shards
from apo_jax.layouts.prefix import predictor_index
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.train import train_step as ts

CFG = get_preset(
    "tiny", vocab_size=64, n_layers=2, d_model=32, mlp_dim=64, n_heads=4, n_kv_heads=2, head_dim=8
)
# (prompt, chosen, rejected) lengths; the last pair is the loader's padding pair.
LENGTHS = [(5, 4, 6), (3, 7, 2), (9, 1, 5), (1, 3, 3)]


def batches(seed=0, with_padding_pair=True):
    """The same pairs through the loader's collate in both layouts."""
    rng = np.random.default_rng(seed)
    items = []
    for i, (p, c, r) in enumerate(LENGTHS):
        rec = shards.PairRecord(*(rng.integers(1, 64, n).astype(np.int32) for n in (p, c, r)), i)
        items.append((i, shards.serialize(rec)))
    if with_padding_pair:
        items.append((-1, b""))
    n = len(items)
    ref_w, ref_l = (
        rng.normal(size=n).astype(np.float32) - 9,
        rng.normal(size=n).astype(np.float32) - 9,
    )
    out = []
    for layout, seq_len in (("concat", 16), ("prefix", 24)):
        collate = loader.Collate(layouts.get(layout), layouts.RowSpec(seq_len), ref_w, ref_l)
        out.append({k: jnp.asarray(v) for k, v in collate(items).items()})
    return out


def model_state(seed=0):
    return ts.split_model(Llama(CFG, rngs=nnx.Rngs(seed)))


def test_predictor_index_points_the_first_rejected_token_at_the_prompt_end():
    idx = predictor_index(jnp.asarray([3, 0]), jnp.asarray([2, 0]), 7)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 2, 5, 6], [0, 1, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("reference", ["precomputed", "online"])
def test_pair_logps_equal_concat_layout(reference):
    concat, prefix = batches()
    graphdef, params = model_state()
    ref_params = model_state(seed=1)[1]
    cfg = ts.StepConfig(reference=reference, logprob_chunk=5)
    want = ts.pair_logps(graphdef, params, concat, cfg, ref_params)
    got = ts.pair_logps(
        graphdef, params, prefix, dataclasses.replace(cfg, layout=layouts.get("prefix")), ref_params
    )
    for name in [f for f in losses.PairLogps._fields if getattr(want, f) is not None]:
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-4, err_msg=name
        )
    # Not trivially equal: the pairs differ, and a wrong boundary token would shift a sum by ~4.
    assert float(jnp.std(got.chosen[:4])) > 1.0


def test_loss_and_grads_equal_concat_layout():
    concat, prefix = batches()
    graphdef, params = model_state()
    cfg = ts.StepConfig(loss="apo_down")

    def loss(params, batch, layout):
        step = dataclasses.replace(cfg, layout=layouts.get(layout))
        logps = ts.pair_logps(graphdef, params, batch, step)
        valid = batch["index"] >= 0
        loss_N, _ = losses.preference_loss(cfg.loss, logps, beta=cfg.beta, where=valid)
        return jnp.sum(jnp.where(valid, loss_N, 0.0)) / jnp.sum(valid)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)  # compiled: eager is slower
    l1, g1 = grad(params, concat, "concat")
    l2, g2 = grad(params, prefix, "prefix")
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    assert_same_grads(g1, g2, atol=1e-7)


def test_prefix_rows_are_shorter():
    concat, prefix = batches(with_padding_pair=False)
    assert prefix["input_ids"].shape[0] * 2 == concat["input_ids"].shape[0]
    assert int(prefix["segment_ids"].sum()) < int(concat["segment_ids"].sum())
