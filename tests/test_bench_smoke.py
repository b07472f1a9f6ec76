"""Smoke tests of the benchmark scripts' helpers at tiny shapes (the benchmarks are not tests)."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import common  # noqa: E402
import logprob_memory  # noqa: E402
import step_vs_torch  # noqa: E402

from apo_jax.logprobs import naive_sequence_logps, sequence_logps  # noqa: E402


def test_forward_flops_counts_matmul_params_and_attention():
    cfg = common.STEP_MODEL
    shp = common.Shapes(pairs=1, seq=8, prompt=4)
    matmul_params = (
        cfg.n_params - cfg.vocab_size * cfg.d_model - cfg.d_model * (2 * cfg.n_layers + 1)
    )
    attn = cfg.n_layers * 2 * 4 * 8 * 8 * cfg.n_heads * cfg.head_dim
    assert step_vs_torch.forward_flops(cfg, shp) == 2 * matmul_params * 16 + attn


def test_concat_batch_shares_prompts():
    b = common.concat_batch(common.Shapes(pairs=2, seq=8, prompt=3), vocab=50)
    np.testing.assert_array_equal(b["input_ids"][:2, :3], b["input_ids"][2:, :3])
    assert b["completion_mask"].sum() == 4 * 5


def test_chunked_head_uses_less_compiled_memory_than_naive():
    shapes = (
        jax.ShapeDtypeStruct((4, 64, 16), jnp.float32),
        jax.ShapeDtypeStruct((16, 512), jnp.float32),
        jax.ShapeDtypeStruct((4, 64), jnp.int32),
        jax.ShapeDtypeStruct((4, 64), jnp.int32),
    )
    naive, _ = logprob_memory.compiled_memory(naive_sequence_logps, shapes)
    chunked, _ = logprob_memory.compiled_memory(
        functools.partial(sequence_logps, chunk_size=8), shapes
    )
    assert chunked.temp_size_in_bytes < naive.temp_size_in_bytes / 2


def test_table_is_markdown():
    out = common.table(("a", "bb"), [(1, 2), (333, 4)])
    assert out.splitlines()[1].startswith("| ---")
    assert len({len(line) for line in out.splitlines()}) == 1
