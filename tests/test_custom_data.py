"""README's custom-data command: the demo preset on your own model and shards.

The demo preset turns samples on; on custom data they follow the data: the first prompts of the
held-out split's source file when there is a held-out split, off otherwise, never an error.
"""

import json
import os

import pytest

from apo_jax.config import base_config, with_overrides
from apo_jax.train import data as data_lib
from apo_jax.train import loop, samples


@pytest.fixture(scope="module")
def hf_model(make_hf_llama, tok_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    path, _ = make_hf_llama(
        vocab_size=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    return str(path)


def _run(workdir, **extra):
    """README: --config=configs/apo_down.py --config.model.hf_path=DIR --config.data.train=SHARDS
    --config.lora.rank=16, with only sizes made smaller."""
    o = {
        "num_steps": 1,
        "batch_size": 4,
        "progress_bar": False,
        "export_hf": False,
        "plots": False,
        "checkpoint.async_save": False,
        "lora.rank": 16,
        "samples.max_new_tokens": 4,
        **extra,
    }
    return loop.train_and_evaluate(with_overrides(base_config("apo_down", None), o), workdir)


def test_custom_data_without_eval_trains_with_samples_off(hf_model, small_shards, tmp_path):
    summary = _run(str(tmp_path), **{"model.hf_path": hf_model, "data.train": small_shards})
    assert summary["steps"] == 1 and summary["samples"] == []
    assert not os.path.exists(tmp_path / "samples.jsonl")


def test_custom_data_with_eval_samples_its_prompts(hf_model, small_shards, small_pairs, tmp_path):
    summary = _run(
        str(tmp_path),
        **{"model.hf_path": hf_model, "data.train": small_shards, "data.eval": small_shards},
    )
    first = [r["prompt"] for r in small_pairs[1][:3]]  # the eval shards' source, in order
    assert [r["prompt"] for r in summary["samples"]] == first
    assert all("correct" not in r for r in summary["samples"])  # the demo checker stays off
    with open(tmp_path / "samples.jsonl") as f:  # the starting model (step 0), then step 1
        assert [json.loads(line)["step"] for line in f] == [0, 0, 0, 1, 1, 1]
    assert [r["prompt"] for r in summary["samples_before"]] == first


def test_samples_are_off_when_the_eval_source_is_gone(tmp_path, small_shards):
    manifest = json.load(open(os.path.join(small_shards, "manifest.json")))
    moved = tmp_path / "eval"
    moved.mkdir()
    manifest["inputs"] = [str(tmp_path / "gone.jsonl")]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    paths = data_lib.DataPaths(small_shards, str(moved), "", manifest)
    rows, why = samples.sample_rows(paths, 3)
    assert rows == [] and "gone.jsonl is not on this machine; pass config.samples.prompts" in why
