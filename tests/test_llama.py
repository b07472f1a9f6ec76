"""Llama forward: parity with transformers, masks, packing, causality, config and presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax.models import config as config_lib
from apo_jax.models import families
from apo_jax.models.hf import load_hf
from apo_jax.models.llama import Llama


@nnx.jit(static_argnames="return_hidden")
def forward(model, ids, positions=None, segments=None, mask=None, return_hidden=False):
    """One compiled forward per shape: much faster on CPU than eager op-by-op dispatch."""
    return model(ids, positions, segments, mask, return_hidden=return_hidden)


def _torch_logits(model, ids, attention_mask=None):
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize(
    "n_kv_heads,head_dim,tied,llama3,scan",
    [
        (4, 16, True, False, True),  # MHA (ratio 1), tied
        (2, 24, False, True, True),  # GQA ratio 2, head_dim != D/H, llama3 rope scaling
        (1, 8, True, True, False),  # ratio 4 (MQA), unrolled layers
        (2, 16, False, False, False),
    ],
)
def test_parity_with_transformers(make_hf_llama, n_kv_heads, head_dim, tied, llama3, scan):
    path, hf_model = make_hf_llama(
        n_kv_heads=n_kv_heads, head_dim=head_dim, tied=tied, llama3=llama3
    )
    model, cfg = load_hf(path, scan_layers=scan)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (n_kv_heads, head_dim, tied)
    assert (cfg.rope_scaling is not None) == llama3
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 40))
    ref = _torch_logits(hf_model, ids)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    got = np.asarray(forward(model, jnp.asarray(ids)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_parity_right_padding(make_hf_llama):
    path, hf_model = make_hf_llama(n_kv_heads=2, llama3=True)
    model, _ = load_hf(path)
    ids = np.random.RandomState(2).randint(3, 256, (3, 12))
    lengths = np.array([12, 7, 3])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    ref = _torch_logits(hf_model, ids, mask)
    got = np.asarray(forward(model, jnp.asarray(ids), segments=jnp.asarray(mask, jnp.int32)))
    assert np.isfinite(got).all(), "padded query rows must not produce NaN"
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)
    # Without segment ids (plain causal, no mask array) every real token is unchanged.
    causal = np.asarray(forward(model, jnp.asarray(ids)))
    np.testing.assert_allclose(causal[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.get_preset("tiny", vocab_size=128)
    return nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(0)))(), cfg  # one compile, not op-by-op


def _graphdef(cfg):
    """The graphdef of a model with config `cfg` (no weights are built)."""
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0]


def test_causality_gradient_wrt_later_embeddings_is_zero(tiny):
    model, cfg = tiny
    T, t = 8, 3
    ids = jnp.arange(T)[None] % cfg.vocab_size
    graphdef, state = nnx.split(model)

    def out_at_t(st):
        return nnx.merge(graphdef, st)(ids)[0, t].sum()

    # ids are 0..T-1, so row s of the embedding gradient is the gradient wrt token s's embedding.
    grad_VxD = np.asarray(jax.jit(jax.grad(out_at_t))(state)["embed_tokens"]["embedding"][...])
    assert np.abs(grad_VxD[t + 1 : T]).max() == 0.0, "later tokens leak into position t"
    assert np.abs(grad_VxD[: t + 1]).max() > 0.0


def test_packed_rows_equal_separate_sequences(tiny):
    model, cfg = tiny
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, cfg.vocab_size, 5), rng.randint(0, cfg.vocab_size, 4)
    packed = jnp.asarray(np.concatenate([a, b, [0]])[None])
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0]])
    positions = jnp.asarray([list(range(5)) + list(range(4)) + [0]])
    got = np.asarray(forward(model, packed, positions, segments))
    alone_a = np.asarray(forward(model, jnp.asarray(a[None])))
    alone_b = np.asarray(forward(model, jnp.asarray(b[None])))
    np.testing.assert_allclose(got[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(got[0, 5:9], alone_b[0], atol=1e-5)
    assert np.isfinite(got).all()


def test_explicit_mask_overrides_segments(tiny):
    model, _ = tiny
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    # prompt (0..1) shared; completion A (2..3) and completion B (4..5) each see only the prompt.
    allow = np.tril(np.ones((6, 6), bool))
    allow[4:, 2:4] = False
    pos = jnp.asarray([[0, 1, 2, 3, 2, 3]])
    got = np.asarray(forward(model, ids, pos, mask=jnp.asarray(allow[None])))
    alone = np.asarray(forward(model, jnp.asarray([[5, 6, 9, 10]])))
    np.testing.assert_allclose(got[0, 4:], alone[0, 2:], atol=1e-5)


def test_hidden_and_unembedding(tiny):
    model, cfg = tiny
    ids = jnp.asarray([[1, 2, 3]])
    hidden = forward(model, ids, return_hidden=True)
    assert hidden.shape == (1, 3, cfg.d_model)
    assert model.unembedding().shape == (cfg.d_model, cfg.vocab_size)
    np.testing.assert_allclose(hidden @ model.unembedding(), forward(model, ids), atol=1e-5)


def test_remat_policies_give_same_grads(tiny):
    model, cfg = tiny
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    _, state = nnx.split(model)
    graphdefs = [_graphdef(cfg.replace(remat=r)) for r in ("none", "full", "save_dots")]

    @jax.jit
    def grads(st):
        return [jax.grad(lambda s, g=g: nnx.merge(g, s)(ids).sum())(st) for g in graphdefs]

    g_ref, *g_remat = grads(state)
    for g in g_remat:
        for x, y in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_f32(tiny):
    model, cfg = tiny
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    _, state = nnx.split(model)
    bf16 = nnx.merge(_graphdef(cfg.replace(dtype="bfloat16")), state)
    out = forward(bf16, ids)
    assert out.dtype == jnp.float32
    assert forward(bf16, ids, return_hidden=True).dtype == jnp.bfloat16
    np.testing.assert_allclose(out, forward(model, ids), atol=0.05)


def test_presets_and_validation():
    assert config_lib.get_preset("llama3_8b").n_params == pytest.approx(8.03e9, rel=0.01)
    assert config_lib.get_preset("llama3_1b").n_params == pytest.approx(1.24e9, rel=0.01)
    assert config_lib.get_preset("llama3_70b").n_params == pytest.approx(70.6e9, rel=0.01)
    assert config_lib.get_preset("tiny", vocab_size=1000).vocab_size == 1000
    with pytest.raises(config_lib.ConfigError, match="unknown preset"):
        config_lib.get_preset("gpt2")
    with pytest.raises(config_lib.ConfigError, match="multiple of n_kv_heads"):
        config_lib.get_preset("tiny", n_kv_heads=3)
    with pytest.raises(config_lib.ConfigError, match="remat"):
        config_lib.get_preset("tiny", remat="some")
    with pytest.raises(config_lib.ConfigError, match="attention"):
        config_lib.get_preset("tiny", attention="flash")


@pytest.mark.parametrize("dtype,expected", [("bfloat16", "cudnn"), ("float32", "xla")])
def test_auto_attention_picks_cudnn_on_gpu_for_16_bit_and_blocked_on_cpu(
    monkeypatch, dtype, expected
):
    attn = nnx.eval_shape(
        lambda: Llama(config_lib.get_preset("tiny", head_dim=16), rngs=nnx.Rngs(0))
    ).layers.self_attn
    assert attn.implementation(jnp.dtype(dtype), cached=False) == "blocked"  # CPU
    assert attn.implementation(jnp.dtype(dtype), cached=True) == "xla"  # KV-cache decode
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn.implementation(jnp.dtype(dtype), cached=False) == expected
    assert attn.implementation(jnp.dtype(dtype), cached=True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attn.implementation(jnp.dtype(dtype), cached=False) == "xla"


@pytest.mark.parametrize("t,block", [(13, 4), (64, 8), (40, 64)])
@pytest.mark.parametrize("mask_kind", ["causal", "segments", "prefix"])
def test_blocked_attention_equals_full_causal_attention_and_its_gradient(t, block, mask_kind):
    from apo_jax.models.layers import attention_mask, blocked_causal_attention

    B, H, K, Dh = 2, 4, 2, 8
    ks = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(ks[0], (B, t, H, Dh))
    k = jax.random.normal(ks[1], (B, t, K, Dh))
    v = jax.random.normal(ks[2], (B, t, K, Dh))
    mask = None
    if mask_kind == "segments":
        seg = jnp.asarray([[1] * (t // 3) + [2] * (t - t // 3 - 2) + [0, 0], [1] * t])
        mask = attention_mask((B, t), segment_ids_BxT=seg)
    elif mask_kind == "prefix":  # a random mask: the blocked path must apply any mask exactly
        mask = attention_mask((B, t), attn_mask_BxTxT=jax.random.bernoulli(ks[3], 0.6, (B, t, t)))
    scale = Dh**-0.5

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, mask, scale, block=block, max_blocks=4)

    def full(q, k, v):
        m = None if mask is None else mask[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, is_causal=mask is None)

    np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.key(1), (B, t, H, Dh))
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * w)  # noqa: E731
    for a, b in zip(
        jax.jit(jax.grad(loss(blocked), (0, 1, 2)))(q, k, v),  # compiled: eager is slower
        jax.jit(jax.grad(loss(full), (0, 1, 2)))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_blocked_and_xla_attention_give_the_same_model_logits():
    cfg = config_lib.get_preset("tiny", max_seq_len=256)
    model = Llama(cfg.replace(attention="xla"), rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    blocked = nnx.merge(_graphdef(cfg.replace(attention="blocked")), state)
    ids = jax.random.randint(jax.random.key(2), (2, 200), 0, cfg.vocab_size)
    seg = jnp.concatenate([jnp.ones((2, 120), jnp.int32), 2 * jnp.ones((2, 80), jnp.int32)], 1)
    for kwargs in ({}, {"segments": seg}):
        np.testing.assert_allclose(
            forward(blocked, ids, **kwargs), forward(model, ids, **kwargs), rtol=1e-4, atol=1e-4
        )


def test_config_hf_round_trip():
    for name in ("tiny", "llama3_1b", "llama3_8b"):
        cfg = config_lib.get_preset(name)
        back = families.config_from_hf(
            families.to_hf(cfg), param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat
        )
        assert back == cfg, name
    legacy = families.to_hf(dataclasses.replace(config_lib.get_preset("llama3_1b")))
    legacy["rope_theta"] = legacy["rope_parameters"].pop("rope_theta")
    legacy["rope_scaling"] = legacy.pop("rope_parameters")  # transformers-4 layout
    assert families.config_from_hf(legacy).rope_scaling.factor == 32.0
    linear = families.to_hf(config_lib.get_preset("tiny"))
    linear["rope_parameters"] = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(config_lib.ConfigError, match="'linear'; supported: default, llama3"):
        families.config_from_hf(linear)
    with pytest.raises(config_lib.ConfigError, match="unsupported Llama variant: mlp_bias=true"):
        families.config_from_hf({**legacy, "mlp_bias": True})


def test_scanned_layers_give_unrolled_grads(make_hf_llama):
    """Scanned layers recompute their element-wise ops in the backward (remat 'none' under
    lax.scan); the gradients must still be those of the unrolled layers, which keep everything."""
    path, _ = make_hf_llama(n_kv_heads=2, n_layers=3)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 70)))
    grads = {}
    for scan in (True, False):
        model, cfg = load_hf(path, scan_layers=scan)
        assert cfg.remat == "none"
        graphdef, state = nnx.split(model)

        @jax.jit
        def grad(st, graphdef=graphdef):
            return jax.grad(lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(ids))))(st)

        flat = jax.tree_util.tree_flatten_with_path(grad(state))[0]
        grads[scan] = {jax.tree_util.keystr(p): np.asarray(g) for p, g in flat}
    for key, g in grads[True].items():
        if key.startswith("['layers']"):  # [L, ...] against layer i's own gradient
            rest = key[len("['layers']") :]
            want = np.stack([grads[False][f"['layers'][{i}]{rest}"] for i in range(3)])
        else:
            want = grads[False][key]
        scale = np.abs(want).max()
        assert scale > 1e-3, key
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5 * scale, err_msg=key)
