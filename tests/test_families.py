"""Qwen2, Qwen3, Mistral and Gemma 3 against transformers: logits, layouts, generation, export.

Each family is a tiny random `*ForCausalLM` made here with transformers (initializer_range 0.3,
norms and biases randomized too, so a wrong norm offset, bias or rotation shows far above float32
round-off) and saved to a temporary directory. Sliding windows (Mistral 5, Gemma 3 4) are shorter
than the rows, so a window that is off by one or counted in row indices instead of positions
fails these tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax.models import families
from apo_jax.models.config import PRESETS, ConfigError, get_preset
from apo_jax.models.generate import generate
from apo_jax.models.hf import CheckpointError, load_hf, save_hf

FAMILIES = ("qwen2", "qwen3", "mistral", "gemma3")
V = 96


def hf_config(family: str, **kw):
    """A tiny transformers config of the family (keyword args override)."""
    import transformers

    common = dict(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen2":
        common.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        common.update(tie_word_embeddings=True)
        return transformers.Qwen2Config(**{**common, **kw})
    if family == "qwen3":
        return transformers.Qwen3Config(**{**common, **kw})
    if family == "mistral":
        return transformers.MistralConfig(**{**common, "sliding_window": 5, **kw})
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    }
    common.update(sliding_window=4, query_pre_attn_scalar=20, rope_parameters=rope)
    common.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return transformers.Gemma3TextConfig(**{**common, **kw})


_CACHE: dict = {}


@pytest.fixture(scope="module")
def make_hf(tmp_path_factory):
    """Factory: family -> (checkpoint dir, transformers model), cached per family."""

    def make(family: str):
        if family in _CACHE:
            return _CACHE[family]
        import torch
        import transformers

        torch.manual_seed(0)
        if family == "qwen2_sliding":  # sliding layers from max_window_layers on
            config = hf_config(
                "qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1
            )
        else:
            config = hf_config(family)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.normal_(0.0, 0.3)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        _CACHE[family] = (path, model)
        return _CACHE[family]

    return make


def _torch_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@nnx.jit
def _forward(model, ids, positions=None, segments=None, attn_mask=None):
    return model(ids, positions, segments, attn_mask)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_sliding"])
def test_right_padded_logits_match_transformers(make_hf, family):
    path, hf_model = make_hf(family)
    lengths = np.array([14, 9, 3])
    ids = np.random.RandomState(1).randint(3, V, (3, 14))
    mask = (np.arange(14)[None] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    ref = _torch_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    model, cfg = load_hf(path)  # scanned layers, blocked attention on CPU
    assert cfg.family == family.removesuffix("_sliding")
    for seg in (None, jnp.asarray(mask)):  # plain causal and with segment ids
        got = np.asarray(_forward(model, jnp.asarray(ids), segments=seg))
        np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)
    if family == "gemma3":  # unrolled layers take each layer's kind statically; XLA attention
        model, _ = load_hf(path, attention="xla", scan_layers=False)
        got = np.asarray(_forward(model, jnp.asarray(ids), segments=jnp.asarray(mask)))
        np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_packed_and_prefix_rows_match_each_sequence_alone(make_hf, family):
    """Windows count positions: packed sequences and a prefix row's second branch keep theirs."""
    path, hf_model = make_hf(family)
    model, _ = load_hf(path)
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, V, 9), rng.randint(3, V, 7)
    # packed: a then b in one row, positions restarting, then padding
    ids = np.concatenate([a, b, [0, 0]])[None]
    pos = np.concatenate([np.arange(9), np.arange(7), [0, 0]])[None]
    seg = np.concatenate([np.ones(9), 2 * np.ones(7), [0, 0]]).astype(np.int32)[None]
    got = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))
    np.testing.assert_allclose(got[0, :9], _torch_logits(hf_model, a[None])[0], atol=1e-4)
    np.testing.assert_allclose(got[0, 9:16], _torch_logits(hf_model, b[None])[0], atol=1e-4)
    # prefix: prompt p, completions c1 and c2; c2 sees p but not c1, positions continue from p
    p, c1, c2 = rng.randint(3, V, 6), rng.randint(3, V, 5), rng.randint(3, V, 4)
    ids = np.concatenate([p, c1, c2])[None]
    pos = np.concatenate([np.arange(6), 6 + np.arange(5), 6 + np.arange(4)])[None]
    branch = np.array([0] * 6 + [1] * 5 + [2] * 4)
    allowed = (branch[:, None] == branch[None, :]) | (branch[None, :] == 0)
    got = np.asarray(
        _forward(model, jnp.asarray(ids), jnp.asarray(pos), attn_mask=jnp.asarray(allowed[None]))
    )
    alone = _torch_logits(hf_model, np.concatenate([p, c2])[None])[0]
    np.testing.assert_allclose(got[0, 11:], alone[6:], atol=1e-4)
    np.testing.assert_allclose(got[0, :6], alone[:6], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(make_hf, family):
    import torch

    path, hf_model = make_hf(family)
    model, _ = load_hf(path)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, V, n).tolist() for n in (7, 2)]
    ours = generate(model, prompts, max_new_tokens=10)
    for prompt, row in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
            )
        assert row == out[0, len(prompt) :].tolist(), (family, prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip_through_transformers(make_hf, family, tmp_path):
    import transformers

    path, hf_model = make_hf(family)
    model, cfg = load_hf(path)
    assert families.config_from_hf(families.to_hf(cfg), attention=cfg.attention) == cfg
    save_hf(model, cfg, tmp_path, max_shard_size=40_000)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again).__name__ == type(hf_model).__name__
    ids = np.random.RandomState(4).randint(3, V, (2, 11))
    np.testing.assert_allclose(_torch_logits(again, ids), _torch_logits(hf_model, ids), atol=1e-5)


def test_presets_round_trip_through_hf_configs():
    for name in ("qwen2_5_7b", "qwen3_8b", "mistral_7b", "gemma3_4b"):
        cfg = PRESETS[name]
        keep = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat)
        assert families.config_from_hf(families.to_hf(cfg), **keep) == cfg, name
    gemma = PRESETS["gemma3_4b"]
    assert gemma.sliding_layers.count(False) == 5 and gemma.sliding_layers[5] is False
    assert round(gemma.n_params / 1e9, 2) == 3.88  # Gemma-3-4B's text decoder
    assert round(PRESETS["qwen3_8b"].n_params / 1e9, 2) == 8.19


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        families.config_from_hf({"model_type": "gpt2"})
    hf = families.to_hf(PRESETS["gemma3_4b"])
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        families.config_from_hf({**hf, "final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="layer_types has sliding layers but no sliding_window"):
        get_preset("tiny", n_layers=2, layer_types=("sliding_attention", "full_attention"))
    odd = get_preset("tiny", family="qwen2")  # qwen2 without q/k/v bias: not a Qwen2 class
    with pytest.raises(CheckpointError, match="family 'qwen2' has qkv_bias=True"):
        save_hf(None, odd, tmp_path / "x")
    biased = get_preset("tiny", qkv_bias=True)  # a llama with q/k/v biases: not a Llama class
    with pytest.raises(ConfigError, match="family 'llama' has qkv_bias=False"):
        families.to_hf(biased)
    assert not os.path.exists(tmp_path / "x")


_EIGHT_DEVICES = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from apo_jax import sharding
    from apo_jax.models.hf import load_hf

    assert jax.device_count() == 8
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 96, (8, 12)))
    seg = jnp.asarray((np.arange(12)[None] < np.array([12, 9, 5, 12, 3, 12, 7, 1])[:, None]) * 1)

    def loss(state, graphdef, ids, seg):
        logits = nnx.merge(graphdef, state)(ids, segment_ids_BxT=seg)
        return (logits**2).mean(), logits

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    for path in sys.argv[1:]:
        model, _ = load_hf(path)
        graphdef, state = nnx.split(model)
        (ref_loss, ref_logits), ref_grads = fn(state, graphdef, ids, seg)
        model, _ = load_hf(path, mesh=mesh)
        graphdef, state = nnx.split(model)
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
        with jax.set_mesh(mesh):
            (got_loss, logits), grads = fn(state, graphdef, put(ids), put(seg))
        np.testing.assert_allclose(logits, ref_logits, atol=5e-5)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-4)
    print("OK")
    """
)


def test_eight_devices_equal_one(make_hf):
    """Gemma 3 (mixed layers with scanned flags, q/k norms, sandwich norms) on a 2x2x2 mesh."""
    paths = [str(make_hf("gemma3")[0])]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES, *paths],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_multimodal_gemma3_checkpoint_loads_its_text_decoder(tmp_path):
    """`Gemma3ForConditionalGeneration` files (vision tower, nested text_config) on text input."""
    import torch
    import transformers

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=hf_config("gemma3").to_dict(),
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=V - 3,
        eoi_token_index=V - 2,
        image_token_index=V - 1,
    )
    torch.manual_seed(1)
    hf_model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    hf_model.save_pretrained(tmp_path)
    ids = np.random.RandomState(5).randint(3, V - 3, (2, 14))
    model, got_cfg = load_hf(tmp_path)
    assert got_cfg.family == "gemma3" and got_cfg.sliding_window == 4
    got = np.asarray(_forward(model, jnp.asarray(ids)))
    np.testing.assert_allclose(got, _torch_logits(hf_model, ids), atol=1e-4, rtol=1e-4)
