"""Unpaired objectives (kto, apo_zero_unpaired) against values worked out in numpy from the
formulas of the KTO and APO papers as TRL's KTOTrainer writes them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax import losses
from apo_jax.losses import UnpairedLogps, kl_estimate, unpaired_loss

POLICY = np.array([-12.0, -7.5, -20.0, -3.0, -9.0], np.float32)
REFERENCE = np.array([-10.0, -8.0, -19.0, -6.0, -9.5], np.float32)
LABEL = np.array([True, False, True, False, False])


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_unpaired(name, beta, kl, wd, wu):
    r = POLICY.astype(np.float64) - REFERENCE
    z = max(kl, 0.0)
    if name == "kto":
        des, und = 1 - _sig(beta * (r - z)), 1 - _sig(beta * (z - r))
    else:
        des, und = 1 - _sig(beta * r), _sig(beta * r)
    return np.where(LABEL, wd * des, wu * und), r


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl", [0.7, -0.3])
def test_matches_formulas_and_metrics(name, kl):
    beta, wd, wu = 0.3, 1.0, 1.33
    logps = UnpairedLogps(POLICY, REFERENCE, LABEL, jnp.float32(kl))
    loss_N, m = unpaired_loss(name, logps, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want, r = _numpy_unpaired(name, beta, kl, wd, wu)
    np.testing.assert_allclose(loss_N, want, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], want.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], max(kl, 0.0) if name == "kto" else 0.0, atol=1e-7)
    np.testing.assert_allclose(m["rewards/chosen"], beta * r[LABEL].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], beta * r[~LABEL].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        m["rewards/margins"], beta * (r[LABEL].mean() - r[~LABEL].mean()), rtol=1e-5
    )
    np.testing.assert_allclose(m["logps/chosen"], POLICY[LABEL].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], POLICY[~LABEL].mean(), rtol=1e-6)


def test_zero_log_ratio_gradients():
    """At r = 0 every example costs 1/2 and moves by beta/4: up when desirable, down when not."""
    beta = 0.1
    label = np.array([True, False])
    for name in ("kto", "apo_zero_unpaired"):

        def total(policy, name=name):
            logps = UnpairedLogps(policy, jnp.zeros(2), label, 0.0)
            return jnp.sum(unpaired_loss(name, logps, beta=beta)[0])

        np.testing.assert_allclose(total(jnp.zeros(2)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(jax.grad(total)(jnp.zeros(2)), [-beta / 4, beta / 4], rtol=1e-5)


def test_kl_estimate_is_clamped_masked_and_constant():
    pol, ref = jnp.array([-3.0, -5.0, -100.0]), jnp.array([-4.0, -5.5, 0.0])
    where = jnp.array([True, True, False])
    np.testing.assert_allclose(kl_estimate(pol, ref, where), 0.75, rtol=1e-6)
    assert float(kl_estimate(ref, pol, where)) == 0.0  # negative mean -> 0

    def total(policy_kl):
        kl = kl_estimate(policy_kl, ref, where)
        logps = UnpairedLogps(jnp.array([-1.0, -2.0, -3.0]), jnp.zeros(3), LABEL[:3], kl)
        return jnp.sum(unpaired_loss("kto", logps)[0])

    assert not np.any(jax.grad(total)(pol))  # TRL detaches the KL term


def test_where_excludes_padding_and_empty_side_reports_zero():
    logps = UnpairedLogps(POLICY, REFERENCE, LABEL, 0.0)
    where = np.array([True, True, False, False, False])
    _, m = unpaired_loss("apo_zero_unpaired", logps, where=where)
    want, r = _numpy_unpaired("apo_zero_unpaired", 0.1, 0.0, 1.0, 1.0)
    np.testing.assert_allclose(m["loss"], want[:2].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 0.1 * r[0], rtol=1e-6)
    only_bad = UnpairedLogps(POLICY[1:2], REFERENCE[1:2], LABEL[1:2], 0.0)
    _, m = unpaired_loss("kto", only_bad)
    assert float(m["rewards/chosen"]) == 0.0 and float(m["logps/chosen"]) == 0.0


def test_errors_and_registry():
    with pytest.raises(ValueError, match="KL estimate"):
        unpaired_loss("kto", UnpairedLogps(POLICY, REFERENCE, LABEL))
    with pytest.raises(ValueError, match="unknown unpaired loss"):
        unpaired_loss("sigmoid", UnpairedLogps(POLICY, REFERENCE, LABEL, 0.0))
    assert losses.is_unpaired("kto") and losses.is_unpaired("apo_zero_unpaired")
    assert not losses.is_unpaired("apo_zero") and losses.needs_reference("kto")


def _trl_kto_loss(loss_type, policy, ref, label, kl_policy, kl_ref, beta, wd, wu):
    """TRL 1.16's KTOTrainer._compute_loss on given sequence log-probs: a stub model returns them
    as one completion token per row, precomputed reference log-probs come with the batch."""
    import collections
    import types

    torch = pytest.importorskip("torch")
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    n = len(policy)
    ones, mask = torch.ones(n, 2, dtype=torch.long), torch.tensor([[0, 1]] * n)
    batch = {
        "input_ids": ones,
        "attention_mask": ones,
        "completion_mask": mask,
        "label": torch.tensor(label),
        "ref_logps": torch.tensor(ref),
    }
    if loss_type == "kto":
        batch.update(
            KL_input_ids=2 * ones,
            KL_attention_mask=ones,
            KL_completion_mask=mask,
            ref_KL_logps=torch.tensor(kl_ref),
        )

    def model(input_ids, **_):
        logps = policy if int(input_ids[0, 0]) == 1 else kl_policy
        zeros = torch.zeros(n, 1)
        return types.SimpleNamespace(
            log_probs=torch.tensor(logps)[:, None], entropy=zeros, mean_logits=zeros
        )

    trainer = object.__new__(kto_trainer.KTOTrainer)  # only the loss code, no model or data
    trainer.__dict__.update(
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=loss_type == "kto",
        loss_type=loss_type,
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": collections.defaultdict(list)},
    )
    loss = trainer._compute_loss(model, batch, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_against_trl_kto_trainer(name):
    kl_pol = np.array([-5.0, -6.0, -7.0, -2.0, -9.0], np.float32)
    kl_ref = np.array([-6.0, -6.5, -7.0, -4.0, -8.0], np.float32)
    beta, wd, wu = 0.3, 1.0, 1.33
    want_loss, want = _trl_kto_loss(
        name,
        POLICY.tolist(),
        REFERENCE.tolist(),
        LABEL.tolist(),
        kl_pol.tolist(),
        kl_ref.tolist(),
        beta,
        wd,
        wu,
    )
    kl = kl_estimate(kl_pol, kl_ref)
    loss_N, got = unpaired_loss(
        name,
        UnpairedLogps(POLICY, REFERENCE, LABEL, kl),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    np.testing.assert_allclose(float(jnp.mean(loss_N)), want_loss, rtol=1e-5)
    for key in (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=key)
