"""Tests of the preference losses: closed forms, gradients, numerics, registry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax import losses
from apo_jax.losses import PairLogps

BETA = 0.1
sig = jax.nn.sigmoid


def dsig(z):
    return sig(z) * (1 - sig(z))


def _pairs(seed=0, n=6, scale=3.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda: jnp.asarray(rng.normal(size=n) * scale - 20.0, dtype)  # noqa: E731
    return PairLogps(
        chosen=f(),
        rejected=f(),
        ref_chosen=f(),
        ref_rejected=f(),
        chosen_tokens=jnp.asarray(rng.integers(1, 30, size=n), jnp.float32),
        rejected_tokens=jnp.asarray(rng.integers(1, 30, size=n), jnp.float32),
    )


def _grads(name, p, **hp):
    """Gradient of the summed loss with respect to the four log-prob inputs."""

    def f(w, l, rw, rl):  # noqa: E741
        x = p._replace(chosen=w, rejected=l, ref_chosen=rw, ref_rejected=rl)
        return jnp.sum(losses.preference_loss(name, x, beta=BETA, **hp)[0])

    return jax.grad(f, argnums=(0, 1, 2, 3))(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected)


def _zero_ratio_pairs(n=4):
    w = jnp.full((n,), -12.0)
    l = jnp.full((n,), -12.0)  # noqa: E741
    t = jnp.full((n,), 6.0)
    return PairLogps(w, l, w, l, t, t)


LOG2 = math.log(2.0)
ZERO_RATIO_VALUES = {
    "sigmoid": LOG2,
    "dpo": LOG2,
    "hinge": 1.0,
    "ipo": (1 / (2 * BETA)) ** 2,
    "robust": LOG2,
    "exo_pair": 0.5 * (math.log(0.5) - math.log1p(-1e-3)) + 0.5 * (math.log(0.5) - math.log(1e-3)),
    "nca_pair": 2 * LOG2,
    "bco_pair": 2 * LOG2,
    "sppo_hard": 2 * (0.5 / BETA) ** 2,
    "aot": LOG2,
    "aot_unpaired": LOG2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * LOG2 + 0.5,
    "sigmoid_norm": LOG2,
    "sft": 12.0 / 6.0,  # -(-12) per pair, 6 tokens each: 2 nats per token
    "simpo": math.log1p(math.exp(0.5)),  # -log sigma(-gamma), gamma = 0.5
    "orpo": 2.0 + BETA * LOG2,  # -(-12/6) - lambda log sigma(0)
}


def test_registry_lists_every_loss_the_issue_names():
    assert set(ZERO_RATIO_VALUES) == set(losses.names())


@pytest.mark.parametrize("name", sorted(ZERO_RATIO_VALUES))
def test_value_at_zero_log_ratios(name):
    loss_N, metrics = losses.preference_loss(name, _zero_ratio_pairs(), beta=BETA)
    np.testing.assert_allclose(loss_N, ZERO_RATIO_VALUES[name], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ZERO_RATIO_VALUES[name], rtol=1e-5)


def test_robust_label_smoothing_keeps_log2_at_zero_margin():
    loss_N, _ = losses.preference_loss("robust", _zero_ratio_pairs(), label_smoothing=0.2)
    np.testing.assert_allclose(loss_N, LOG2, rtol=1e-6)


def test_dpo_gradient_closed_form():
    p = _pairs(1)
    gw, gl, grw, grl = _grads("sigmoid", p)
    d = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)
    expected = -BETA * sig(-BETA * d)
    np.testing.assert_allclose(gw, expected, rtol=1e-5)
    np.testing.assert_allclose(gl, -expected, rtol=1e-5)
    np.testing.assert_allclose(grw, -expected, rtol=1e-5)
    np.testing.assert_allclose(grl, expected, rtol=1e-5)


def test_apo_zero_gradient_closed_form_and_signs():
    p = _pairs(2)
    gw, gl, grw, grl = _grads("apo_zero", p)
    rw, rl = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    np.testing.assert_allclose(gw, -BETA * dsig(BETA * rw), rtol=1e-5)
    np.testing.assert_allclose(gl, BETA * dsig(BETA * rl), rtol=1e-5)
    np.testing.assert_allclose(grw, -gw, rtol=1e-5)
    np.testing.assert_allclose(grl, -gl, rtol=1e-5)
    # Anchoring: a descent step raises the chosen likelihood and lowers the rejected one.
    assert np.all(np.asarray(gw) < 0) and np.all(np.asarray(gl) > 0)


def test_apo_down_gradient_closed_form_and_signs():
    p = _pairs(3)
    gw, gl, grw, grl = _grads("apo_down", p)
    rw, rl = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    np.testing.assert_allclose(
        gw, BETA * dsig(BETA * rw) - BETA * dsig(BETA * (rw - rl)), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(gl, BETA * dsig(BETA * (rw - rl)), rtol=1e-5)
    np.testing.assert_allclose(grw, -gw, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grl, -gl, rtol=1e-5)
    # The rejected likelihood is always pushed down.
    assert np.all(np.asarray(gl) > 0)


def test_apo_down_pushes_both_down_rejected_more_from_the_reference():
    # At the start of training (policy == reference) the anchor term and the contrastive term:
    # the chosen term alone lowers y_w, the total lowers y_l more than y_w.
    p = _zero_ratio_pairs()
    gw, gl, _, _ = _grads("apo_down", p)
    chosen_term = jax.grad(lambda w: jnp.sum(sig(BETA * (w - p.ref_chosen))))(p.chosen)
    assert np.all(np.asarray(chosen_term) > 0)
    assert np.all(np.asarray(gl) > np.asarray(gw)) and np.all(np.asarray(gw) >= 0)
    # APO-zero from the same point: chosen up, rejected down, symmetrically.
    zw, zl, _, _ = _grads("apo_zero", p)
    np.testing.assert_allclose(zw, -zl, rtol=1e-6)
    assert np.all(np.asarray(zw) < 0)


@pytest.mark.parametrize(
    "name", ["sigmoid", "apo_zero", "apo_down", "ipo", "discopop", "orpo", "simpo", "nca_pair"]
)
def test_gradients_match_finite_differences(name):
    p = _pairs(4, n=3, scale=2.0)
    grads = _grads(name, p)
    args = [p.chosen, p.rejected, p.ref_chosen, p.ref_rejected]

    def f(*a):
        x = p._replace(chosen=a[0], rejected=a[1], ref_chosen=a[2], ref_rejected=a[3])
        return float(jnp.sum(losses.preference_loss(name, x, beta=BETA)[0]))

    eps = 1e-2
    for k, g in enumerate(grads):
        for i in range(3):
            plus = [a.at[i].add(eps) if j == k else a for j, a in enumerate(args)]
            minus = [a.at[i].add(-eps) if j == k else a for j, a in enumerate(args)]
            fd = (f(*plus) - f(*minus)) / (2 * eps)
            np.testing.assert_allclose(
                g[i], fd, rtol=2e-2, atol=2e-4, err_msg=f"{name} input {k} pair {i}"
            )


@pytest.mark.parametrize("name", losses.names())
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_extreme_log_ratios_stay_finite(name, magnitude):
    n = 4
    w = jnp.asarray([magnitude, -magnitude, 0.0, magnitude], jnp.float32) - 5.0
    l = jnp.asarray([-magnitude, magnitude, magnitude, 0.0], jnp.float32) - 5.0  # noqa: E741
    ref = jnp.full((n,), -5.0)
    toks = jnp.asarray([1.0, 7.0, 300.0, 2.0])
    p = PairLogps(w, l, ref, ref, toks, toks)
    loss_N, _ = losses.preference_loss(name, p)
    grads = _grads(name, p)
    assert np.all(np.isfinite(np.asarray(loss_N))), loss_N
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))), (name, g)


@pytest.mark.parametrize("name", losses.names())
def test_bfloat16_inputs_compute_in_float32(name):
    p32 = _pairs(5)
    p16 = PairLogps(*[None if a is None else a.astype(jnp.bfloat16) for a in p32])
    loss16, metrics = losses.preference_loss(name, p16)
    back = PairLogps(*[None if a is None else a.astype(jnp.float32) for a in p16])
    loss32, _ = losses.preference_loss(name, back)
    assert loss16.dtype == jnp.float32 and metrics["loss"].dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(loss16)))


def test_mixture_is_weighted_sum_and_string_form_agrees():
    p = _pairs(6)
    mix, _ = losses.preference_loss([("apo_zero", 1.0), ("sft", 0.1)], p)
    a, _ = losses.preference_loss("apo_zero", p)
    s, _ = losses.preference_loss("sft", p)
    np.testing.assert_allclose(mix, a + 0.1 * s, rtol=1e-6)
    mix_str, _ = losses.preference_loss("apo_zero + 0.1*sft", p)
    np.testing.assert_allclose(mix_str, mix, rtol=1e-6)


def test_mixture_term_hparams_override_the_shared_ones():
    p = _pairs(7)
    mix, _ = losses.preference_loss([("sigmoid", 1.0, {"beta": 0.5})], p, beta=0.1)
    direct, _ = losses.preference_loss("sigmoid", p, beta=0.5)
    np.testing.assert_allclose(mix, direct, rtol=1e-6)


def test_metrics_have_trl_names_and_meanings():
    p = _pairs(8)
    _, m = losses.preference_loss("apo_zero", p, beta=BETA)
    rw, rl = BETA * (p.chosen - p.ref_chosen), BETA * (p.rejected - p.ref_rejected)
    np.testing.assert_allclose(m["rewards/chosen"], jnp.mean(rw), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], jnp.mean(rl), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], jnp.mean(rw - rl), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], jnp.mean(rw > rl), rtol=1e-6)
    np.testing.assert_allclose(m["logps/chosen"], jnp.mean(p.chosen), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], jnp.mean(p.rejected), rtol=1e-6)


def test_sft_is_token_mean_over_the_batch():
    p = _pairs(9)
    loss_N, _ = losses.preference_loss("sft", p)
    np.testing.assert_allclose(
        jnp.mean(loss_N), -jnp.sum(p.chosen) / jnp.sum(p.chosen_tokens), rtol=1e-5
    )


def test_jit_and_vmap():
    p = _pairs(10, n=8)
    f = jax.jit(lambda x: losses.preference_loss("apo_down", x)[0])
    batched = PairLogps(*[None if a is None else a.reshape(2, 4) for a in p])
    out = jax.vmap(lambda x: losses.preference_loss("apo_down", x)[0])(batched)
    np.testing.assert_allclose(out.reshape(-1), f(p), rtol=1e-6)


def test_errors_name_the_problem():
    p = _pairs(11)
    with pytest.raises(ValueError, match="unknown loss 'apo_up'"):
        losses.preference_loss("apo_up", p)
    with pytest.raises(ValueError, match="needs ref_chosen"):
        losses.preference_loss("apo_zero", p._replace(ref_chosen=None))
    with pytest.raises(TypeError):
        losses.preference_loss("sigmoid", p, not_a_field=1.0)
    # Reference-free losses run without reference log-probs.
    loss_N, _ = losses.preference_loss("simpo", p._replace(ref_chosen=None, ref_rejected=None))
    assert loss_N.shape == (6,)
    assert losses.needs_reference("apo_zero+0.1*sft") and not losses.needs_reference("orpo")
