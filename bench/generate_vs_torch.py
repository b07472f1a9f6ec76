"""Benchmark 7: generation tokens/s, apo_jax's KV-cache loop against transformers' `generate`.

    python bench/generate_vs_torch.py [--prompts 32] [--batch1_prompts 2] [--new 64] [--repeats 3]
    python bench/generate_vs_torch.py --model /work/models/smollm2-hf --new 128 [...]

With `--model` (a Hugging Face directory with a tokenizer and chat template) both sides load that
model, the prompts are the embedded demo's questions in the model's chat template (with the
generation prompt), and every row stops at the model's end-of-turn token (its
`generation_config.json` eos ids, as `python -m apo_jax.eval` does), at most `--new` tokens.
Tokens/s then counts the tokens each side generated, stop tokens included.

One random Llama-3-architecture model (d 256, 4 layers, 8 heads, 2 kv heads, head 32, mlp 768,
vocab 32000, float32), saved as a Hugging Face checkpoint and loaded by both sides; the same
prompts (random token ids, 16 to 96 tokens); greedy; every row generates `--new` tokens (no stop
token). apo_jax runs what `python -m apo_jax.eval` runs: `models.generate.generate`, prompts
left-padded to the length bucket of `apo_jax.eval.generation`, one jitted prefill + `while_loop`
of decode steps. transformers runs `LlamaForCausalLM.generate` (eager, default attention, left
padding with an attention mask, `torch.no_grad`). At batch 1 every prompt is generated alone (a
subset of `--batch1_prompts`); at batch 32 all prompts are one batch. Times are medians of
`--repeats` interleaved rounds after a warm-up call (compilation is reported apart). The last
column checks that both sides produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from common import dot_flops_per_s, machine, median, table, time_interleaved

from apo_jax.eval import generation as eval_gen
from apo_jax.eval.generation import bucket_length
from apo_jax.models import generate as generate_lib
from apo_jax.models.hf import load_hf

MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_model(path: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(3, MODEL["vocab_size"], size=int(rng.integers(16, 97))).tolist()
        for _ in range(n)
    ]


STOPS: list[int] = []  # the real model's end-of-turn ids (empty: no stop, every row `new` long)


def chat_prompts(model_dir: str, n: int) -> list[list[int]]:
    """The demo's questions as single-turn chat prompts in the model's template, token ids."""
    import transformers

    from apo_jax.data import demo

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = demo.generate_pairs(n, seed=1, multi_turn=0.0)
    return [eval_gen.encode(tok, r["chosen"][:-1]) for r in rows]


def trim(row: list[int]) -> list[int]:
    """A row up to and including its first stop token."""
    for j, t in enumerate(row):
        if t in STOPS:
            return row[: j + 1]
    return row


def jax_generate(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    pad_to = bucket_length(max(len(p) for p in prompts))
    return generate_lib.generate(
        model, prompts, max_new_tokens=new, pad_to=pad_to, stop_tokens=STOPS, include_stop=True
    )


def torch_generate(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as for batched decoder-only generation
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    stop = dict(eos_token_id=STOPS) if STOPS else dict(eos_token_id=None, min_new_tokens=new)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **stop
        )
    return [trim(r) for r in out[:, width:].tolist()]


def decode_flops(cfg, batch: int, context: int) -> float:
    """FLOPs of one decode step of ``batch`` rows at ``context`` cached positions: every matmul
    weight once per row (the tied head included), plus attention's scores and values."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * cfg.mlp_dim
    weights = cfg.n_layers * per_layer + d * cfg.vocab_size
    attention = cfg.n_layers * cfg.n_heads * hd * context * 2
    return 2.0 * batch * (weights + attention)


def work(cfg, groups: list[list[list[int]]], out: list[list[int]]) -> float:
    """FLOPs of the decode steps both sides run: a batch steps until its longest row stops."""
    total, k = 0.0, 0
    for g in groups:
        steps = max(len(r) for r in out[k : k + len(g)])
        width = max(len(p) for p in g)
        total += sum(decode_flops(cfg, len(g), width + i) for i in range(steps))
        k += len(g)
    return total


def run(
    n_prompts: int, batch1: int, new: int, repeats: int, model_dir: str = ""
) -> list[list[object]]:
    if model_dir:
        import transformers

        STOPS[:] = eval_gen.stop_token_ids(
            transformers.AutoTokenizer.from_pretrained(model_dir), model_dir
        )
        prompts = chat_prompts(model_dir, n_prompts)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        jx_model, _ = load_hf(model_dir)
    else:
        prompts = make_prompts(n_prompts)
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = make_model(tmp)
            jx_model, _ = load_hf(tmp)
    rows = []
    for batch, groups in ((1, [[p] for p in prompts[:batch1]]), (n_prompts, [prompts])):
        t0 = time.perf_counter()
        jx_out = [row for g in groups for row in jax_generate(jx_model, g, new)]
        first_call = time.perf_counter() - t0
        pt_out = [row for g in groups for row in torch_generate(hf_model, g, new)]
        same = sum(a == b for a, b in zip(jx_out, pt_out, strict=True)) / len(jx_out)
        times = time_interleaved(
            {
                "jax": lambda gs=groups: [jax_generate(jx_model, g, new) for g in gs],
                "torch": lambda gs=groups: [torch_generate(hf_model, g, new) for g in gs],
            },
            repeats,
            warmup=0,
        )
        tokens = sum(len(r) for r in jx_out)  # generated, stop tokens included
        torch_tokens = sum(len(r) for r in pt_out)
        jax_tps, torch_tps = tokens / median(times["jax"]), torch_tokens / median(times["torch"])
        flops = work(jx_model.cfg, groups, jx_out)
        jax_gf, torch_gf = flops / median(times["jax"]) / 1e9, flops / median(times["torch"]) / 1e9
        rows.append(
            [
                batch,
                len(groups),
                tokens,
                f"{jax_tps:,.0f}",
                f"{torch_tps:,.0f}",
                f"{jax_tps / torch_tps:.2f}x",
                f"{first_call - median(times['jax']):.1f}",
                f"{same:.0%}",
                f"{jax_gf:.0f}",
                f"{torch_gf:.0f}",
            ]
        )
    return rows
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32, help="prompts (the batch-32 batch)")
    p.add_argument("--batch1_prompts", type=int, default=2, help="prompts generated one by one")
    p.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--model", default="", help="a Hugging Face model dir: chat prompts, real stops")
    args = p.parse_args()
    rows = run(args.prompts, args.batch1_prompts, args.new, args.repeats, args.model)
    ceiling = dot_flops_per_s() / 1e9
    print(
        f"float32 jnp.dot 2048^3 ceiling: {ceiling:.0f} GFLOP/s (decode GFLOP/s columns count "
        "every weight once per row and step, and attention over the cache)"
    )
    print(f"model: {args.model or 'random, ' + str(MODEL)}; load average {os.getloadavg()[0]:.1f}")
    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        table(
            [
                "batch",
                "calls",
                "tokens",
                "apo_jax tok/s",
                "transformers tok/s",
                "speed-up",
                "compile s",
                "same tokens",
                "apo_jax GFLOP/s",
                "transformers GFLOP/s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
