"""TRL's DPO options through the config and the train step: LD-DPO log-probs, WPO weights from
the model's own distribution, TR-DPO's reference mixing, and the config's refusals."""

import dataclasses
import os
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax import config as config_lib
from apo_jax.config import base_config, with_overrides
from apo_jax.layouts import concat
from apo_jax.models.llama import Llama
from apo_jax.train import train_step as ts
from tests.test_train_step import CFG, make_batch


def _model():
    return ts.split_model(Llama(CFG, rngs=nnx.Rngs(0)))


def test_ld_alpha_weights_the_longer_tail_of_policy_and_reference():
    graphdef, params = _model()
    batch = make_batch(n=3, seed=1)
    mask = np.asarray(batch["completion_mask"])
    n = 3
    shared = np.minimum(mask[:n].sum(1), mask[n:].sum(1))
    pos = np.cumsum(mask, axis=1)
    head = (mask * (pos <= np.concatenate([shared, shared])[:, None])).astype(np.int32)
    full_R, _ = concat.row_logps(graphdef, params, batch, 8)
    head_R, _ = concat.row_logps(graphdef, params, {**batch, "completion_mask": head}, 8)
    want = head_R + 0.3 * (full_R - head_R)
    cfg = ts.StepConfig(loss="sigmoid", reference="online", ld_alpha=0.3, logprob_chunk=8)
    got = ts.pair_logps(graphdef, params, batch, cfg, ref_params=params)
    np.testing.assert_allclose(got.chosen, want[:n], rtol=1e-5)
    np.testing.assert_allclose(got.rejected, want[n:], rtol=1e-5)
    np.testing.assert_allclose(got.ref_chosen, want[:n], rtol=1e-5)  # TRL weights both
    np.testing.assert_allclose(got.chosen_tokens, mask[:n].sum(1))  # counts stay plain


def test_wpo_weights_from_the_models_distribution():
    graphdef, params = _model()
    batch = make_batch(n=2, seed=2)
    logits = np.asarray(nnx.merge(graphdef, params)(batch["input_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_sum_sq = np.log((np.exp(logp) ** 2).sum(-1))
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["completion_mask"])
    want = []
    for b in range(4):
        ts_ = [t for t in range(1, ids.shape[1]) if mask[b, t]]
        want.append(
            np.exp(np.mean([logp[b, t - 1, ids[b, t]] - log_sum_sq[b, t - 1] for t in ts_]))
        )
    cfg = ts.StepConfig(loss="sigmoid", loss_hparams=(("use_weighting", True),), logprob_chunk=8)
    got = ts.pair_logps(graphdef, params, batch, cfg)
    np.testing.assert_allclose(got.chosen_weight, want[:2], rtol=1e-4)
    np.testing.assert_allclose(got.rejected_weight, want[2:], rtol=1e-4)
    loss, _ = ts.loss_fn(params, graphdef, batch, cfg)
    plain, _ = ts.loss_fn(params, graphdef, batch, dataclasses.replace(cfg, loss_hparams=()))
    assert float(loss) < float(plain)  # weights are probabilities-like, below 1 here


def test_mix_reference_is_trdpo_soft_update():
    ref = {"w": jnp.array([1.0, 2.0])}
    pol = {"w": jnp.array([3.0, -2.0])}
    mixed = ts.mix_reference(ref, pol, 0.6)
    np.testing.assert_allclose(mixed["w"], [0.6 * 3 + 0.4 * 1, 0.6 * -2 + 0.4 * 2], rtol=1e-6)
    cfg = ts.StepConfig(sync_every=4, sync_alpha=0.6)
    synced = []
    for s in range(1, 13):  # the state after step s; TRL syncs at multiples of the period only
        state = SimpleNamespace(step=jnp.int32(s), params=pol, ref_params=ref)
        got = ts.sync_reference(state, cfg)
        if not np.array_equal(got["w"], ref["w"]):
            np.testing.assert_allclose(got["w"], mixed["w"], rtol=1e-6)
            synced.append(s)
    assert synced == [4, 8, 12]
    assert ts.sync_reference(state, ts.StepConfig()) is ref  # TR-DPO off: the reference stays


def _validate(loss, **overrides):
    c = with_overrides(base_config(loss, "demo"), overrides)
    return config_lib.validate(c, device_count=1)


@pytest.mark.parametrize(
    "loss, overrides, message",
    [
        ("apo_zero", {"loss.f_divergence_type": "js_divergence"}, "works only with"),
        ("dpo", {"loss.f_divergence_type": "chi2"}, "must be one of"),
        ("aot", {"loss.use_weighting": True, "data.layout": "concat"}, "aot"),
        ("dpo", {"loss.ld_alpha": 0.5, "data.layout": "packed"}, "need config.data.layout=concat"),
        ("dpo", {"loss.ld_alpha": 1.5}, "ld_alpha must be in"),
        (
            "dpo",
            {"loss.ld_alpha": 0.5, "data.layout": "concat", "reference.mode": "precomputed"},
            "loss.ld_alpha needs the online",
        ),
        (
            "dpo",
            {"reference.sync_ref_model": True, "reference.mode": "precomputed"},
            "sync_ref_model needs the online",
        ),
        ("dpo", {"reference.sync_ref_model": True, "lora.rank": 8}, "LoRA run's reference"),
        ("kto", {"data.layout": "packed"}, "must be 'unpaired'"),
        ("dpo", {"data.layout": "unpaired"}, "must be 'unpaired'"),
        ("dpo", {"data.layout": "unpaired"}, "must be 'unpaired'"),
        ("kto", {"data.layout": "unpaired", "loss.use_weighting": True}, "takes no"),
    ],
)
def test_config_refuses(loss, overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _validate(loss, **overrides)


def test_config_resolves_reference_and_layout():
    rc = _validate("dpo", **{"loss.ld_alpha": 0.5, "data.layout": "concat"})
    assert rc.reference.mode == "online" and rc.loss.ld_alpha == 0.5
    assert dict(rc.loss.hparams)["f_divergence_type"] == "reverse_kl"
    rc = _validate("dpo", **{"reference.sync_ref_model": True})
    assert rc.reference.mode == "online"
    assert _validate("kto", **{"data.layout": "unpaired"}).data.layout.kl
    assert not _validate("apo_zero_unpaired", **{"data.layout": "unpaired"}).data.layout.kl


def test_auto_layout_follows_the_loss():
    """layout=auto is decided by the loss where the loss allows one layout only."""
    assert _validate("kto").data.layout.name == "unpaired"
    assert _validate("kto").data.layout.kl
    assert not _validate("apo_zero_unpaired").data.layout.kl
    assert _validate("dpo", **{"loss.ld_alpha": 0.5}).data.layout.name == "concat"
    assert _validate("dpo", **{"loss.use_weighting": True}).data.layout.name == "concat"
    assert _validate("dpo").data.layout is None  # picked from the data once the shards are known


def test_trdpo_resume_continues_the_mixed_reference(tmp_path):
    """A TR-DPO checkpoint holds the reference it has mixed: a run resumed from step 2 trains
    steps 3 and 4 to the losses of the run that never stopped."""
    import shutil

    from apo_jax.data import demo
    from apo_jax.train import loop
    from tests.test_train import losses_by_step, small_overrides

    cache = str(tmp_path / "demo")
    demo.build_demo(cache, n_train=256, n_eval=64, multi_turn=0.0)
    overrides = small_overrides(
        cache,
        num_steps=4,
        **{
            "reference.sync_ref_model": True,
            "reference.ref_model_sync_steps": 1,
            "reference.ref_model_mixup_alpha": 0.6,
            "optim.learning_rate": 0.05,
        },
    )
    config = with_overrides(base_config("apo_down", None), overrides)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    loop.train_and_evaluate(config, straight)
    shutil.copytree(
        os.path.join(straight, "checkpoints", "2"), os.path.join(split, "checkpoints", "2")
    )  # a run stopped at step 2
    shutil.copy(os.path.join(straight, "config.json"), split)  # (checkpoints alone are refused)
    loop.train_and_evaluate(config, split)
    want, got = losses_by_step(straight), losses_by_step(split)
    assert sorted(got) == [3, 4]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6), (s, want, got)
