"""GGUF import (`apo_jax.models.gguf_read`, `convert.gguf_to_hf_dir`, `resolve_model_path`).

Tiny llama and gemma3 files are written here with `gguf.GGUFWriter` (tests/gguf_helpers.py) in
every tensor type the issue names; the imported directory's weights must equal
`gguf.quants.dequantize` exactly (after undoing llama.cpp's q/k permutation or (1 + w) norms), and
its logits must equal transformers' own GGUF loading of the same file.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from gguf_helpers import (
    CHATML,
    GEMMA_TINY,
    Q,
    Tiny,
    chat_ids,
    gguf_name,
    ours_logits,
    transformers_logits,
    write_model,
)

from apo_jax.eval.runner import resolve_model_dir
from apo_jax.models import convert, gguf_read
from apo_jax.models.hf import load_hf
from apo_jax.models.safetensors_io import SafetensorsFile

K_TINY = Tiny(d=256, heads=4, kv=2, head_dim=64, mlp=256, layers=1)  # rows of 256 for K-quants


def imported(tmp_path, family, qtype, t):
    path = str(tmp_path / f"{family}.gguf")
    written = write_model(path, family, qtype, t)
    out = str(tmp_path / "hf")
    convert.gguf_to_hf_dir(path, out)
    return path, out, written


def check_exact(out, written, family, t):
    """Every imported tensor equals gguf.quants.dequantize of the stored one, conventions undone."""
    st = SafetensorsFile(os.path.join(out, "model.safetensors"))
    assert len(st.keys()) == len(written)
    for hf_name in st.keys():
        data, qtype = written[gguf_name(hf_name, family, t.layers)]
        want = gguf.quants.dequantize(data, qtype)
        got = np.asarray(st.get(hf_name))
        if family == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            got = gguf_read.permute_qk(got, t.heads if "q_proj" in hf_name else t.kv)
        if family == "gemma3" and hf_name.endswith("norm.weight"):
            got = got + np.float32(1.0)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=hf_name)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=str)
def test_llama_import_equals_dequantize_and_transformers(tmp_path, qtype):
    path, out, written = imported(tmp_path, "llama", qtype, Tiny())
    check_exact(out, written, "llama", Tiny())
    ids = chat_ids(out)
    assert ids[0] == 1 and 2 in ids  # <|im_start|> ... <|im_end|> from the GGUF's template
    np.testing.assert_allclose(ours_logits(out, ids), transformers_logits(path, ids), atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=str)
def test_k_quants_from_raw_blocks(tmp_path, qtype):
    path, out, written = imported(tmp_path, "llama", qtype, K_TINY)
    check_exact(out, written, "llama", K_TINY)
    ids = chat_ids(out)
    np.testing.assert_allclose(ours_logits(out, ids), transformers_logits(path, ids), atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=str)
def test_gemma3_import(tmp_path, qtype):
    path, out, written = imported(tmp_path, "gemma3", qtype, GEMMA_TINY)
    check_exact(out, written, "gemma3", GEMMA_TINY)
    ids = chat_ids(out)
    assert len(ids) > 2 * GEMMA_TINY.window  # the sliding window matters
    np.testing.assert_allclose(ours_logits(out, ids), transformers_logits(path, ids), atol=1e-4)
    _, cfg = load_hf(out)
    assert cfg.family == "gemma3" and cfg.tie_embeddings and cfg.sliding_window == 4
    assert cfg.layer_types[-1] == "full_attention" and cfg.layer_types[0] == "sliding_attention"
    assert cfg.rope_local_theta == 1e4 and cfg.query_pre_attn_scalar == 256


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_import(tmp_path, family):
    """qwen2 (q/k/v biases) and qwen3 (q/k norms): no q/k permutation in llama.cpp's files.

    transformers reads no head_dim from a qwen3 file (Qwen3Config's 128 stays), so it is 128."""
    t = Tiny(heads=2, kv=1, head_dim=128) if family == "qwen3" else Tiny()
    path, out, written = imported(tmp_path, family, Q.Q8_0, t)
    check_exact(out, written, family, t)
    ids = chat_ids(out)
    ours = ours_logits(out, ids)
    np.testing.assert_allclose(ours, transformers_logits(path, ids), atol=1e-4)
    assert load_hf(out)[1].family == family
    exported = str(tmp_path / "export.gguf")  # and back out, as transformers reads it
    convert.to_gguf(out, exported, "f32")
    np.testing.assert_allclose(transformers_logits(exported, ids), ours, atol=1e-4)


def test_directory_has_tokenizer_template_and_generation_config(tmp_path):
    import json

    _, out, _ = imported(tmp_path, "llama", Q.F32, Tiny())
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    with open(os.path.join(out, "chat_template.jinja")) as f:
        assert f.read() == CHATML
    assert sorted(os.listdir(tmp_path)) == ["hf", "llama.gguf"]  # no temporary left behind


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    from apo_jax.models import layers
    from apo_jax.models.config import Llama3RopeScaling, LlamaConfig

    rs = Llama3RopeScaling(factor=32.0)
    cfg = LlamaConfig(head_dim=16, rope_theta=1e5, rope_scaling=rs)
    freqs = layers.rope_inv_freq(cfg.replace(rope_scaling=None)) / layers.rope_inv_freq(cfg)
    path = str(tmp_path / "l3.gguf")
    write_model(path, "llama", Q.F32, Tiny(), extra={"rope_freqs.weight": (freqs, None)})
    got = gguf_read.config_from_gguf(gguf_read.open_gguf(path))
    assert got.rope_scaling == rs


def test_resolve_model_path_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    path = str(tmp_path / "m.gguf")
    write_model(path, "llama", Q.Q8_0, Tiny())
    out = convert.resolve_model_path(path)
    assert out == str(tmp_path / "cache" / convert.file_hash(path)[:16])
    assert os.listdir(tmp_path / "cache") == [os.path.basename(out)]
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert convert.resolve_model_path(path) == out
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp  # not converted again
    assert convert.resolve_model_path(str(tmp_path)) == str(tmp_path)  # a directory: unchanged
    assert resolve_model_dir(path) == out  # eval --model=m.gguf
    from apo_jax.clair.local import _load_checkpoint

    _, tok = _load_checkpoint(path)  # clair --<role>_checkpoint=m.gguf
    assert tok.chat_template == CHATML


def test_train_config_takes_a_gguf_hf_path(tmp_path, monkeypatch):
    from apo_jax import config as config_lib
    from apo_jax.config import base_config, with_overrides

    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "cache"))
    path = str(tmp_path / "m.gguf")
    write_model(path, "llama", Q.F32, Tiny())
    c = with_overrides(base_config("apo_zero", None), {"model.hf_path": path})
    rc = config_lib.validate(c, device_count=1)
    assert rc.model.hf_path == convert.resolve_model_path(path)
    assert os.path.exists(os.path.join(rc.model.hf_path, "config.json"))
