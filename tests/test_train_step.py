"""Tests of the pure train step: learning, accumulation, reference modes, skipping bad updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax import layouts
from apo_jax.layouts import concat
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.optim import OptimConfig, make_optimizer
from apo_jax.train import train_step as ts

CFG = get_preset(
    "tiny", vocab_size=64, n_layers=2, d_model=32, mlp_dim=64, n_heads=4, n_kv_heads=2, head_dim=8
)


def make_batch(n=4, t=16, seed=0, vocab=64):
    """A 'concat' batch of n random pairs: prompt of 5 tokens, completions of varying length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(2 * n, t)).astype(np.int32)
    ids[n:, :5] = ids[:n, :5]  # chosen and rejected share the prompt
    lengths = rng.integers(8, t + 1, size=2 * n)
    pos = np.arange(t)[None, :]
    real = pos < lengths[:, None]
    return {
        "input_ids": jnp.asarray(np.where(real, ids, 0)),
        "completion_mask": jnp.asarray((real & (pos >= 5)).astype(np.int32)),
        "positions": jnp.asarray(np.broadcast_to(pos, (2 * n, t)).astype(np.int32)),
        "segment_ids": jnp.asarray(real.astype(np.int32)),
        "index": jnp.arange(n, dtype=jnp.int32),
        "ref_chosen_logps": jnp.asarray(rng.normal(size=n) - 40, jnp.float32),
        "ref_rejected_logps": jnp.asarray(rng.normal(size=n) - 40, jnp.float32),
    }


def setup(step_cfg=None, lr=1e-2, seed=0, opt="adamw"):
    step_cfg = step_cfg or ts.StepConfig()
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    graphdef, params = ts.split_model(model)
    tx, sched = make_optimizer(OptimConfig(name=opt, learning_rate=lr, schedule="constant"), 100)
    state = ts.init_state(params, tx, seed)
    step = jax.jit(
        lambda s, b, r=None: ts.train_step(
            s, b, r, graphdef=graphdef, tx=tx, cfg=step_cfg, schedule=sched
        )
    )
    return graphdef, state, step


def test_loss_decreases_on_a_fixed_batch():
    batch = make_batch()
    _, state, step = setup()
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert int(state.step) == 8 and int(state.skipped) == 0


def test_gradient_accumulation_equals_one_big_batch():
    batch = make_batch(n=4)
    # SGD, so the parameter change is proportional to the gradient (Adam's first step is ~sign(g)).
    _, state1, step1 = setup(ts.StepConfig(grad_accum=1), lr=1.0, opt="sgd")
    _, state2, step2 = setup(ts.StepConfig(grad_accum=2), lr=1.0, opt="sgd")
    s1, m1 = step1(state1, batch)
    s2, m2 = step2(state2, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batches_keep_pairs_together():
    batch = make_batch(n=4)
    micro = layouts.get("concat").micro_batches(batch, 2)
    np.testing.assert_array_equal(micro["input_ids"][1][:2], batch["input_ids"][2:4])  # chosen 2, 3
    np.testing.assert_array_equal(
        micro["input_ids"][1][2:], batch["input_ids"][6:8]
    )  # rejected 2, 3
    np.testing.assert_array_equal(micro["ref_chosen_logps"][1], batch["ref_chosen_logps"][2:4])


def test_online_reference_equals_precomputed():
    batch = make_batch(seed=3)
    graphdef, state, _ = setup()
    ref_params = jax.tree.map(lambda x: x, state.params)
    ref_R, _ = concat.row_logps(graphdef, ref_params, batch, 256)
    pre = dict(batch, ref_chosen_logps=ref_R[:4], ref_rejected_logps=ref_R[4:])
    _, s_pre, step_pre = setup(ts.StepConfig(reference="precomputed"))
    _, s_on, step_on = setup(ts.StepConfig(reference="online"))
    a, ma = step_pre(s_pre, pre)
    b, mb = step_on(s_on, batch, ref_params)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    np.testing.assert_allclose(ma["loss"], 1.0, rtol=1e-6)  # apo_down at zero log-ratios
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_non_finite_update_is_skipped_and_counted():
    batch = make_batch()
    bad = dict(batch, ref_chosen_logps=batch["ref_chosen_logps"].at[0].set(jnp.nan))
    _, state, step = setup()
    before = jax.tree.map(np.asarray, state.params)
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(state.bad_steps) == 1 and int(state.skipped) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, batch)
    assert int(m["skipped"]) == 0 and int(state.bad_steps) == 0 and int(state.skipped) == 1


def test_metrics_report_schedule_and_tokens():
    batch = make_batch()
    _, state, step = setup(lr=3e-3)
    _, m = step(state, batch)
    np.testing.assert_allclose(m["learning_rate"], 3e-3, rtol=1e-6)
    assert int(m["tokens"]) == int(jnp.sum(batch["segment_ids"]))
    for key in (
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "grad_norm",
    ):
        assert np.isfinite(float(m[key])), key


def test_model_flops_counts_every_layer():
    from apo_jax.metrics import model_flops

    one = model_flops(dataclasses.replace(CFG, n_layers=1), 4, 16, online_reference=False)
    two = model_flops(CFG, 4, 16, online_reference=False)
    head = 3 * 2 * CFG.d_model * CFG.vocab_size * 4 * 16
    np.testing.assert_allclose(two - head, 2 * (one - head))  # scanned layers are not counted once
    np.testing.assert_allclose(model_flops(CFG, 4, 16, online_reference=True), two * 4 / 3)


# One apo_down step of the tiny model from a fixed seed on a fixed batch (precomputed reference,
# adamw, lr 1e-2). Any change to the model, the log-prob head, the loss, the layout or the
# optimizer that moves these numbers changes training: if the change is meant to, update them
# and say why in the commit; if not, it is a bug. Round-off across CPUs stays below rtol 1e-5.
GOLDEN_LOSS = 1.0520494
GOLDEN_GRAD_NORM = 0.30797011
GOLDEN_UPDATE_NORM = 1.4880185


def test_golden_one_step():
    _, state, step = setup()
    old = jax.tree.map(np.asarray, state.params)  # the step donates nothing here, but copy anyway
    new_state, m = step(state, make_batch())
    deltas = jax.tree.map(lambda a, b: np.asarray(a) - b, new_state.params, old)
    update_norm = float(
        np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in jax.tree.leaves(deltas)))
    )
    got = (float(m["loss"]), float(m["grad_norm"]), update_norm)
    np.testing.assert_allclose(got, (GOLDEN_LOSS, GOLDEN_GRAD_NORM, GOLDEN_UPDATE_NORM), rtol=1e-5)


def test_weight_decay_masks_by_parameter_name():
    """With zero gradients AdamW moves exactly the decayed weights: no_norms spares norm scales
    and biases (Qwen2's q/k/v), no_norms_no_embed also the embedding, all decays everything."""
    import optax

    cfg = dataclasses.replace(CFG, qkv_bias=True)
    _, params = ts.split_model(Llama(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p + 1.0, params)  # biases start at zero, which decay keeps
    zeros = jax.tree.map(jnp.zeros_like, params)

    def moved(kind):
        opt = OptimConfig(
            learning_rate=1.0, schedule="constant", weight_decay=0.5, decay_mask=kind, clip_norm=0.0
        )
        tx, _ = make_optimizer(opt, 10)
        updates, _ = tx.update(zeros, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
        flat = jax.tree_util.tree_flatten_with_path(changed)[0]
        return {"/".join(k.key for k in path if hasattr(k, "key")): v for path, v in flat}

    no_norms = moved("no_norms")
    assert any(k.endswith("bias") for k in no_norms) and any("norm" in k for k in no_norms)
    for name, decayed in no_norms.items():
        assert decayed == ("norm" not in name and not name.endswith("bias")), name
    no_embed = moved("no_norms_no_embed")
    assert {k for k, v in no_embed.items() if v} == {
        k for k, v in no_norms.items() if v and "embed_tokens" not in k
    }
    assert any("embed_tokens" in k and v for k, v in no_norms.items())
    assert all(moved("all").values())
