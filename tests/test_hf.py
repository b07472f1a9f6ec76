"""HF checkpoint import/export: round trips through transformers, sharded files, bf16, errors."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from apo_jax.models import families, get_preset
from apo_jax.models.hf import CheckpointError, load_hf, save_hf
from apo_jax.models.llama import Llama
from apo_jax.models.safetensors_io import SafetensorsFile, write_safetensors


@nnx.jit
def forward(model, ids):
    return model(ids)


IDS = np.random.RandomState(0).randint(0, 128, (2, 9))


@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
def test_save_hf_loads_in_transformers(tmp_path, tied, scan):
    import torch
    import transformers

    cfg = get_preset("tiny", vocab_size=128, tie_embeddings=tied, scan_layers=scan)
    model = nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(3)))()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "export"
    files = save_hf(model, cfg, out, tokenizer_dir=tok_dir, max_shard_size=60_000)
    assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").exists()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ref = hf_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(IDS))), ref, atol=1e-5)
    # and back in: the sharded checkpoint loads to the same function
    again, cfg2 = load_hf(out, scan_layers=not scan)
    assert cfg2.tie_embeddings == tied
    np.testing.assert_allclose(forward(again, jnp.asarray(IDS)), ref, atol=1e-5)


def test_bf16_export_and_load(tmp_path):
    cfg = get_preset("tiny", vocab_size=128)
    model = nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(4)))()
    save_hf(model, cfg, tmp_path, dtype="bfloat16")
    st = SafetensorsFile(tmp_path / "model.safetensors")
    assert st.get("model.norm.weight").dtype == ml_dtypes.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_hf(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert loaded.embed_tokens.embedding[...].dtype == jnp.bfloat16
    want = model.unembedding().astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(loaded.unembedding()), np.asarray(want))


@pytest.fixture
def checkpoint(make_hf_llama, tmp_path):
    src, _ = make_hf_llama()
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(ckpt, edit):
    st = SafetensorsFile(ckpt / "model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    edit(tensors)
    os.remove(ckpt / "model.safetensors")
    write_safetensors(ckpt / "model.safetensors", tensors)


def test_error_unsupported_model_type(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match="unsupported model_type 'gpt2'; supported: gemma3_text"
    ):
        load_hf(checkpoint)


def test_error_missing_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf(checkpoint)


def test_error_shape_mismatch(checkpoint):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)

    _rewrite(checkpoint, edit)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch .*k_proj.*expected \(32, 64\), got \(8, 64\)"
    ):
        load_hf(checkpoint)


def test_error_extra_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(4)}))
    with pytest.raises(CheckpointError, match="unexpected extra tensor .*q_norm"):
        load_hf(checkpoint)


def test_error_pickle_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(families.to_hf(get_preset("tiny"))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_hf(tmp_path)
