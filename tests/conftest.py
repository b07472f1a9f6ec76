"""Shared pytest fixtures. Add fixtures here; keep heavy imports (torch) inside them.

Compiled programs go to a persistent JAX cache shared by the xdist workers and the subprocesses
the tests start (they inherit the environment), so a step that several tests compile with the
same shapes is compiled once per machine.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "apo_jax_test_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest
from data_helpers import write_jsonl

from apo_jax.data import demo, prepare


@pytest.fixture(scope="session")
def make_hf_llama(tmp_path_factory):
    """Factory: a random tiny transformers `LlamaForCausalLM` saved with safetensors.

    Call `make_hf_llama(n_heads=4, n_kv_heads=2, head_dim=16, tied=False, llama3=False)` (and
    `bos_token_id=`, `eos_token_id=` to match a tokenizer that trains with it); returns
    `(checkpoint_dir, torch_model)`. Weights use initializer_range 0.3 so logits are O(1) and a
    wrong rotation, norm or head mapping shows up far above float32 round-off. Cached per args.
    """
    cache = {}

    def make(
        *,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        head_dim: int = 16,
        tied: bool = False,
        llama3: bool = False,
        vocab_size: int = 256,
        hidden_size: int = 64,
        n_layers: int = 2,
        seed: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
    ):
        key = (
            n_heads,
            n_kv_heads,
            head_dim,
            tied,
            llama3,
            vocab_size,
            hidden_size,
            n_layers,
            seed,
            bos_token_id,
            eos_token_id,
        )
        if key in cache:
            return cache[key]
        import torch
        import transformers

        rope = {"rope_type": "default", "rope_theta": 500000.0}
        if llama3:
            rope = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,  # small, so all three bands occur
            }
        hf_cfg = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=96,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=128,
            rope_parameters=rope,
            rms_norm_eps=1e-5,
            tie_word_embeddings=tied,
            initializer_range=0.3,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(hf_cfg).eval()
        with torch.no_grad():  # norms start at 1; perturb them so a dropped norm weight shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.3 * torch.randn_like(p))
        path = tmp_path_factory.mktemp("hf_llama")
        model.save_pretrained(path, safe_serialization=True)
        cache[key] = (path, model)
        return cache[key]

    return make


def assert_same_grads(want, got, atol: float) -> None:
    """Every gradient leaf of `got` equals `want` (rtol 1e-4), and they are not all zero."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    norms = []
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol)
        norms.append(float(jnp.linalg.norm(a)))
    assert max(norms) > 1e-3  # the gradients are not all zero


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """A small demo tokenizer (byte-level BPE, Llama-3 special tokens and chat template)."""
    rows = demo.generate_pairs(300, seed=1)
    texts = [m["content"] for r in rows for side in ("chosen", "rejected") for m in r[side]]
    return demo.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=512)


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory) -> tuple[str, list[dict]]:
    """A JSONL of 40 generated CLAIR pairs (some multi-turn) and its rows."""
    rows = demo.generate_pairs(40, seed=2)
    return write_jsonl(os.path.join(tmp_path_factory.mktemp("pairs"), "pairs.jsonl"), rows), rows


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, tok_dir, small_pairs) -> str:
    """small_pairs prepared into 3 shards (16 records each at most)."""
    out = str(tmp_path_factory.mktemp("shards"))
    prepare.prepare(
        small_pairs[0], tok_dir, out, prepare.Settings(max_length=256, records_per_shard=16)
    )
    return out
