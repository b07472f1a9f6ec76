"""Smoke tests of the benchmark scripts' helpers at tiny shapes (the benchmarks are not tests)."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import common  # noqa: E402
import gpu_check  # noqa: E402
import logprob_memory  # noqa: E402
import step_vs_torch  # noqa: E402

from apo_jax.logprobs import naive_sequence_logps, sequence_logps  # noqa: E402
from apo_jax.models.config import get_preset  # noqa: E402


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


@pytest.mark.slow  # compiles a bf16 rematerialized LoRA step
def test_gpu_check_lora_step_trains_adapters_on_one_device():
    """gpu.sh's one-device LoRA step (gpu_check --llama8b), miniature model, bf16 base."""
    cfg = get_preset(
        "tiny",
        vocab_size=128,
        d_model=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        mlp_dim=64,
        dtype="bfloat16",
        param_dtype="bfloat16",
        remat="full",
        attention="xla",
    )
    r = gpu_check.lora_step(cfg, rank=4, seqs=(16,), chunk=8, repeats=1, warmup=1)
    assert r["ok"] and r["seq"] == 16 and r["steps"] == 2 and r["tokens_s"] > 0
    # B starts at zero, so step 0's policy is the reference; the update moves it away.
    assert r["losses"][0] != r["losses"][1]
    assert r["memory_analysis"]["total_bytes"] > 0
    # adapters on q,k,v,o,gate,up,down of one layer: A [in, 4] and B [4, out] each
    io = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert r["adapter_params"] == sum(4 * (i + o) for i, o in io)


def test_step_vs_trl_pairs_and_steady_state():
    import step_vs_trl

    short, long = step_vs_trl.short_pairs(2), step_vs_trl.long_pairs(2)
    for rows in (short, long):  # TRL's conversational format: the prompt ends with the user
        assert [r["prompt"][-1]["role"] for r in rows] == ["user", "user"]
        assert all(len(r["chosen"]) == len(r["rejected"]) == 1 for r in rows)
    assert len(long[0]["prompt"][-1]["content"]) > 10 * len(short[0]["prompt"][-1]["content"])
    # Steps that compiled are left out; with none left, their compile time is taken off.
    r = {"step_s": [9.0, 2.0, 5.0, 2.2], "compile_s": [7.0, 0.0, 3.0, 0.0]}
    assert step_vs_trl.steady(r, 1) == 2.1
    assert step_vs_trl.steady({"step_s": [9.0, 5.0], "compile_s": [7.0, 3.0]}, 1) == 2.0
    assert step_vs_trl.steady({"step_s": [9.0, 3.0, 4.0]}, 1) == 3.5  # TRL: nothing compiles


def test_op_profile_names_each_instruction_of_a_scanned_grad():
    import op_profile

    def f(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    w, x = jnp.full((3, 16, 16), 0.01), jnp.ones((4, 16))
    compiled = jax.jit(jax.grad(f)).lower(w, x).compile()
    instrs = op_profile.parse_hlo(compiled.as_text())
    kinds = {op_profile.kind(i) for i in instrs.values()}
    assert {"matmul", "control"} <= kinds  # the dots and the scan's while loop
    bwd = [
        i
        for i in instrs.values()
        if op_profile.kind(i) == "matmul" and "transpose(" in i["op_name"]
    ]
    assert bwd and all(op_profile.short(i["op_name"]).startswith("bwd ") for i in bwd)
    table = op_profile.traced_ops(compiled, lambda: jax.block_until_ready(compiled(w, x)), calls=1)
    assert "| matmul |" in table and "busy time" in table
