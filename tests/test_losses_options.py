"""TRL's DPO regularizers: f-divergence scores, WPO weights, LD-DPO log-probs, option checks.

Expected values are worked out in numpy from the f-DPO, WPO and LD-DPO formulas as TRL 1.16's
DPOTrainer writes them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax import logprobs
from apo_jax.losses import PairLogps, f_divergence_scores, preference_loss

W, L = np.array([-5.0, -9.0, -2.0], np.float32), np.array([-6.0, -8.0, -7.0], np.float32)
RW, RL = np.array([-5.5, -8.0, -4.0], np.float32), np.array([-5.0, -8.5, -6.0], np.float32)
LOGPS = PairLogps(W, L, RW, RL, np.array([4.0, 6.0, 2.0]), np.array([3.0, 6.0, 5.0]))


def _scores(r, kind, alpha=0.5):
    r = r.astype(np.float64)
    return {
        "reverse_kl": r,
        "forward_kl": 1 - np.exp(-r),
        "js_divergence": np.log(2) + np.log(1 / (1 + np.exp(-r))),
        "alpha_divergence": (np.exp((alpha - 1) * r) - 1) / (alpha - 1),
    }[kind]


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_sigmoid_and_ipo(kind):
    beta = 0.5
    sw, sl = _scores(W - RW, kind, 0.3), _scores(L - RL, kind, 0.3)
    opts = {"f_divergence_type": kind, "f_alpha_divergence_coef": 0.3}
    got, _ = preference_loss("sigmoid", LOGPS, beta=beta, **opts)
    np.testing.assert_allclose(got, np.log1p(np.exp(-beta * (sw - sl))), rtol=1e-5)
    got, _ = preference_loss("ipo", LOGPS, beta=beta, **opts)
    want = (sw / LOGPS.chosen_tokens - sl / LOGPS.rejected_tokens - 1 / (2 * beta)) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_alpha_one_is_reverse_kl_and_exponent_is_clamped():
    r = jnp.array([-3.0, 0.0, 2.0])
    np.testing.assert_allclose(f_divergence_scores(r, "alpha_divergence", 1.0), r)
    big = f_divergence_scores(jnp.array([-1e4]), "alpha_divergence", 0.5)  # exp(5e3) -> exp(80)
    np.testing.assert_allclose(big, (np.exp(80.0) - 1) / -0.5, rtol=1e-5)


def test_option_checks():
    with pytest.raises(ValueError, match="works only with"):
        preference_loss("apo_zero", LOGPS, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="must be one of"):
        preference_loss("sigmoid", LOGPS, f_divergence_type="kl")
    with pytest.raises(ValueError, match="aot"):
        preference_loss("aot", LOGPS, use_weighting=True)
    with pytest.raises(ValueError, match="WPO weights"):
        preference_loss("sigmoid", LOGPS, use_weighting=True)


def test_use_weighting_multiplies_by_both_weights():
    wc, wr = np.array([0.5, 0.1, 0.9]), np.array([0.2, 1.0, 0.3])
    plain, _ = preference_loss("apo_zero + 0.5*sft", LOGPS)
    weighted, m = preference_loss(
        "apo_zero + 0.5*sft",
        LOGPS._replace(chosen_weight=wc, rejected_weight=wr),
        use_weighting=True,
    )
    np.testing.assert_allclose(weighted, plain * wc * wr, rtol=1e-6)
    np.testing.assert_allclose(m["loss"], np.mean(plain * wc * wr), rtol=1e-6)


def _tiny_head(seed=0, B=2, T=6, D=4, V=7):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (B, T, D))
    unembed = jax.random.normal(k2, (D, V))
    ids = jax.random.randint(k3, (B, T), 0, V)
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    return hidden, unembed, ids, mask


def test_wpo_weights_match_numpy():
    hidden, unembed, ids, mask = _tiny_head()
    logits = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(unembed))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(logp)
    want = []
    for b in range(2):
        terms = [
            logp[b, t - 1, int(ids[b, t])] - np.log((p[b, t - 1] ** 2).sum())
            for t in range(1, 6)
            if mask[b, t]
        ]
        want.append(np.exp(np.mean(terms)))
    got = logprobs.wpo_weights(hidden, unembed, ids, mask, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ld_mask_gives_shared_plus_alpha_tail():
    hidden, unembed, ids, mask = _tiny_head()
    cw, cl = mask[:1], mask[1:]  # 3 and 5 completion tokens: 3 shared, 2 tail on the rejected side
    mw, ml = logprobs.ld_mask(cw, cl, 0.25)
    np.testing.assert_array_equal(mw, [[0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(ml, [[0, 1, 1, 1, 0.25, 0.25]])
    full, _ = logprobs.naive_sequence_logps(hidden[1:], unembed, ids[1:], cl)
    head, _ = logprobs.naive_sequence_logps(
        hidden[1:], unembed, ids[1:], jnp.array([[0, 1, 1, 1, 0, 0]])
    )
    got, _ = logprobs.sequence_logps(hidden[1:], unembed, ids[1:], ml, chunk_size=4)
    np.testing.assert_allclose(got, head + 0.25 * (full - head), rtol=1e-5)


def _trl_dpo_loss(token_logps, log_sum_sq, mask, ref_w, ref_l, **options):
    """TRL 1.16's DPOTrainer._compute_loss on given per-token log-probs (a stub model returns
    them; precomputed reference log-probs come with the batch)."""
    import collections
    import types

    torch = pytest.importorskip("torch")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    rows, t = mask.shape
    inputs = {
        "input_ids": torch.ones(rows, t, dtype=torch.long),
        "attention_mask": torch.ones(rows, t, dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "ref_chosen_logps": torch.tensor(ref_w),
        "ref_rejected_logps": torch.tensor(ref_l),
    }
    zeros = torch.zeros(rows, t - 1)
    outputs = types.SimpleNamespace(
        log_probs=torch.tensor(token_logps),
        log_sum_sq_probs=torch.tensor(log_sum_sq),
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
    )
    trainer = object.__new__(dpo_trainer.DPOTrainer)  # only the loss code, no model or data
    acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer.__dict__.update(
        accelerator=acc,
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        beta=0.2,
        label_smoothing=0.0,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        use_weighting=False,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": collections.defaultdict(list)},
    )
    trainer.__dict__.update(options)
    return float(trainer._compute_loss(lambda **_: outputs, inputs, return_outputs=False))


@pytest.mark.parametrize(
    "options",
    [
        {"f_divergence_type": "forward_kl"},
        {"f_divergence_type": "js_divergence", "loss_types": ["ipo"]},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"ld_alpha": 0.4, "loss_types": ["apo_zero"]},
        {"use_weighting": True, "loss_types": ["sigmoid", "apo_down"], "loss_weights": [1.0, 0.5]},
    ],
)
def test_against_trl_dpo_trainer(options):
    rng = np.random.default_rng(0)
    n, t = 3, 7
    mask = np.zeros((2 * n, t), np.int64)
    for row, length in enumerate([3, 5, 2, 4, 2, 6]):
        mask[row, t - length :] = 1
    tok = ((rng.normal(size=(2 * n, t - 1)) - 2.0) * mask[:, 1:]).astype(np.float32)
    lss = (rng.normal(size=(2 * n, t - 1)) - 1.5).astype(np.float32)
    ref_w, ref_l = (rng.normal(size=n).astype(np.float32) - 8 for _ in range(2))
    want = _trl_dpo_loss(tok, lss, mask, ref_w, ref_l, **options)

    ld_w, ld_l = logprobs.ld_mask(mask[:n], mask[n:], options.get("ld_alpha", 1.0))
    sums = np.sum(tok * np.concatenate([ld_w, ld_l])[:, 1:], axis=1)
    counts = mask.sum(1).astype(np.float32)  # TRL counts ipo's tokens in input_ids coordinates
    w = np.exp(((tok - lss) * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1))
    p = PairLogps(sums[:n], sums[n:], ref_w, ref_l, counts[:n], counts[n:], w[:n], w[n:])
    spec = [
        (name, wt)
        for name, wt in zip(
            options.get("loss_types", ["sigmoid"]), options.get("loss_weights", [1.0]), strict=True
        )
    ]
    hp = {
        k: options[k]
        for k in ("f_divergence_type", "f_alpha_divergence_coef", "use_weighting")
        if k in options
    }
    if "sft" in dict(spec):  # TRL's sft: the token mean of chosen per-token log-probs, as ours
        p = p._replace(chosen_tokens=mask[:n, 1:].sum(1).astype(np.float32))
    got, _ = preference_loss(spec, p, beta=0.2, **hp)
    np.testing.assert_allclose(float(np.mean(got)), want, rtol=1e-5)
