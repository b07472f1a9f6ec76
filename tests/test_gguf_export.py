"""GGUF export (`apo_jax.models.gguf_write`, `convert.to_gguf`) and the command's one-line errors.

A tiny model is imported from a GGUF written here (tests/gguf_helpers.py), exported again, and
loaded by transformers' own GGUF reader: its logits must equal ours (f32), the metadata must
carry the tokenizer and the hyper-parameters llama.cpp reads, and the narrower dtypes must hold
exactly `gguf.quants` rounding of the weights.
"""

from __future__ import annotations

import os
import shutil

import gguf
import jax
import numpy as np
import pytest
from gguf_helpers import (
    CHATML,
    GEMMA_TINY,
    Q,
    Tiny,
    chat_ids,
    gpt2_vocab,
    ours_logits,
    transformers_logits,
    write_model,
)

from apo_jax.models import convert, gguf_read, lora
from apo_jax.models.hf import load_hf
from apo_jax.models.safetensors_io import SafetensorsFile


def make_dir(tmp_path, family="llama", t=None, qtype=Q.F32) -> str:
    src = str(tmp_path / "src.gguf")
    write_model(src, family, qtype, t or Tiny())
    out = str(tmp_path / "hf")
    convert.gguf_to_hf_dir(src, out)
    return out


def run_cli(*args) -> int:
    try:
        return convert.main(["apo_jax.models.convert", *args])
    except SystemExit as e:
        return e.code


def meta(path, key):
    return gguf_read.metadata(gguf.GGUFReader(path), key, None)


def test_llama_export_loads_in_transformers_with_equal_logits(tmp_path, capsys):
    hf_dir = make_dir(tmp_path)
    out = str(tmp_path / "out.gguf")
    assert run_cli(f"--input={hf_dir}", f"--out={out}") == 0
    assert capsys.readouterr().out == f"wrote {out}: 21 tensors (21 F32)\n"
    ids = chat_ids(hf_dir)
    np.testing.assert_allclose(transformers_logits(out, ids), ours_logits(hf_dir, ids), atol=1e-4)
    vocab = gpt2_vocab()
    assert meta(out, "general.architecture") == "llama"
    assert meta(out, "tokenizer.ggml.model") == "gpt2"
    assert meta(out, "tokenizer.ggml.tokens") == vocab["tokens"]
    assert meta(out, "tokenizer.ggml.merges") == vocab["merges"]
    assert meta(out, "tokenizer.ggml.token_type") == vocab["types"]
    assert [meta(out, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [
        1,
        2,
        2,
    ]
    assert meta(out, "tokenizer.chat_template") == CHATML
    hparams = {
        k: meta(out, f"llama.{k}")
        for k in (
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "rope.freq_base",
        )
    }
    assert hparams == {
        "context_length": 256,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.dimension_count": 16,
        "rope.freq_base": 1e5,
    }
    again = str(tmp_path / "again")  # our own reader takes it back bit for bit
    convert.gguf_to_hf_dir(out, again)
    a, b = (SafetensorsFile(os.path.join(d, "model.safetensors")) for d in (hf_dir, again))
    for name in a.keys():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)


def test_gemma3_export_loads_in_transformers_with_equal_logits(tmp_path):
    hf_dir = make_dir(tmp_path, "gemma3", GEMMA_TINY)
    out = str(tmp_path / "out.gguf")
    convert.to_gguf(hf_dir, out, "f32")
    ids = chat_ids(hf_dir)
    np.testing.assert_allclose(transformers_logits(out, ids), ours_logits(hf_dir, ids), atol=1e-4)
    assert meta(out, "tokenizer.ggml.model") == "llama"
    assert meta(out, "gemma3.attention.sliding_window") == 4


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_narrow_dtypes_hold_gguf_rounding(tmp_path, dtype):
    hf_dir = make_dir(tmp_path)
    out = str(tmp_path / "out.gguf")
    counts = convert.to_gguf(hf_dir, out, dtype)
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    assert counts == {qtype.name: 16, "F32": 5}  # 2-D weights narrowed, the 5 norms kept
    back = str(tmp_path / "back")
    convert.gguf_to_hf_dir(out, back)
    a, b = (SafetensorsFile(os.path.join(d, "model.safetensors")) for d in (hf_dir, back))
    for name in a.keys():
        w = np.asarray(a.get(name))
        want = w if w.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_array_equal(b.get(name), want, err_msg=name)


def test_workdir_and_adapter_inputs(tmp_path):
    hf_dir = make_dir(tmp_path)
    workdir = tmp_path / "run"
    os.makedirs(workdir / "checkpoints")
    shutil.copytree(hf_dir, workdir / "hf")
    out = str(tmp_path / "wd.gguf")
    convert.to_gguf(str(workdir), out, "f32")
    ids = chat_ids(hf_dir)
    np.testing.assert_allclose(transformers_logits(out, ids), ours_logits(hf_dir, ids), atol=1e-4)

    model, cfg = load_hf(hf_dir)
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets="q,k,v,o,gate,up,down")
    lora.attach(model, lcfg, seed=0)
    for _, lin in lora.targeted(model, lcfg.modules):
        lin.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(3), lin.lora_b.shape))
    _, adapters, _ = lora.split(model)
    adapter = str(tmp_path / "adapter")
    lora.save_peft(adapters, lcfg, cfg.n_layers, adapter, base_path=hf_dir)
    out = str(tmp_path / "adapter.gguf")
    convert.to_gguf(adapter, out, "f32")
    merged = ours_logits_merged(adapter, ids)
    assert np.abs(merged - ours_logits(hf_dir, ids)).max() > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(transformers_logits(out, ids), merged, atol=1e-4)


def ours_logits_merged(path, ids):
    import jax.numpy as jnp

    model, _ = lora.load_merged(path)
    return np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]


def err_of(capsys, *args) -> str:
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def test_errors_are_one_line_exit_2_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "text.gguf"
    bad.write_text("not a model\n" * 10)
    assert err_of(capsys, f"--input={bad}", f"--out={out}") == (
        f"error: {bad}: not a GGUF file or truncated (ValueError: GGUF magic invalid)\n"
    )
    good = tmp_path / "good.gguf"
    write_model(str(good), "llama", Q.F32, Tiny())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    assert "truncated" in err_of(capsys, f"--input={cut}", f"--out={out}")
    odd = tmp_path / "odd.gguf"
    q8_1 = np.zeros((4, 40), np.uint8)  # Q8_1: a type gguf.quants cannot dequantize
    write_model(str(odd), "llama", Q.F32, Tiny(), extra={"extra.weight": (q8_1, Q.Q8_1)})
    assert err_of(capsys, f"--input={odd}", f"--out={out}").startswith(
        f"error: {odd}: tensor 'extra.weight' has type Q8_1, which cannot be dequantized; "
        "supported: BF16, F16, F32, "
    )
    gpt2 = tmp_path / "gpt2.gguf"
    write_model(str(gpt2), "llama", Q.F32, Tiny(), arch="gpt2")
    assert err_of(capsys, f"--input={gpt2}", f"--out={out}") == (
        f"error: {gpt2}: unsupported GGUF architecture 'gpt2'; supported: gemma3, llama, qwen2, "
        "qwen3\n"
    )
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (bad, good, cut, odd, gpt2))
    os.makedirs(out)
    assert err_of(capsys, f"--input={good}", f"--out={out}") == (
        f"error: --out={out} exists; pass --overwrite to replace it\n"
    )
    assert run_cli(f"--input={good}", f"--out={out}", "--overwrite") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: llama, 2 layers, vocab 264")
    exported = tmp_path / "m.gguf"
    exported.write_bytes(b"")
    assert err_of(capsys, f"--input={out}", f"--out={exported}") == (
        f"error: --out={exported} exists; pass --overwrite to replace it\n"
    )
    assert exported.read_bytes() == b""


def test_mistral_exports_as_llama_and_sliding_windows_are_refused(tmp_path, capsys):
    import json

    hf_dir = make_dir(tmp_path)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    for window in (None, 4):
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump({**cfg, "model_type": "mistral", "sliding_window": window}, f)
        out = str(tmp_path / f"mistral{window}.gguf")
        if window is None:
            convert.to_gguf(hf_dir, out, "f32")
            assert meta(out, "general.architecture") == "llama"
            ids = chat_ids(hf_dir)
            np.testing.assert_allclose(
                transformers_logits(out, ids), ours_logits(hf_dir, ids), atol=1e-4
            )
        else:
            capsys.readouterr()  # transformers' progress bars above
            assert err_of(capsys, f"--input={hf_dir}", f"--out={out}") == (
                "error: family 'mistral' with sliding-window layers: llama.cpp's llama runs "
                "every layer with full attention\n"
            )
            assert not os.path.exists(out)


def test_pre_tokenizer_name_from_the_split_regex(tmp_path):
    from transformers import AutoTokenizer

    from apo_jax.data import demo
    from apo_jax.models import gguf_vocab

    tok_dir = demo.train_tokenizer(["hello world, one two three"] * 20, str(tmp_path), 300)
    v = gguf_vocab.vocab_metadata(AutoTokenizer.from_pretrained(tok_dir), 320, tok_dir)
    assert (v["model"], v["pre"]) == ("gpt2", "llama3")  # Llama 3's split, as llama.cpp names it
    assert v["tokens"][-1] == "[PAD319]" and v["types"][-1] == gguf.TokenType.UNUSED
    assert v["types"][v["bos"]] == gguf.TokenType.CONTROL


def test_non_finite_weights_are_never_exported(tmp_path, capsys):
    hf_dir = make_dir(tmp_path)
    st = os.path.join(hf_dir, "model.safetensors")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(st)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][0, 0] = np.nan
    save_file(tensors, st, metadata={"format": "pt"})
    out = tmp_path / "nan.gguf"
    assert err_of(capsys, f"--input={hf_dir}", f"--out={out}").startswith(
        f"error: {out}: refusing to export non-finite weights ({name}: 1 of "
    )
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["hf", "src.gguf"]


def test_output_parent_directories_are_made(tmp_path, capsys):
    src = tmp_path / "src.gguf"
    write_model(str(src), "llama", Q.F32, Tiny())
    out = tmp_path / "ckpt" / "tiny"
    assert run_cli(f"--input={src}", f"--out={out}") == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    capsys.readouterr()
    nested = out.parent / "gguf" / "tiny.gguf"
    assert run_cli(f"--input={out}", f"--out={nested}") == 0
    assert nested.stat().st_size > 0
