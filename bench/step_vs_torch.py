"""Benchmarks 1 and 2: apo_jax's APO-down step against the TRL-style PyTorch step, and its MFU.

    python bench/step_vs_torch.py [--repeats 3] [--modes online,precomputed]
        [--jax scan,unrolled,prefix-unrolled]

Shapes (docs/performance.md): Llama-3 architecture, d 512, 8 layers, 8 heads, 2 kv heads,
mlp 1536, vocab 32000, 4 pairs of 512-token rows (half prompt), float32, AdamW. For each reference
mode the JAX step(s) and the PyTorch step are timed interleaved (one call of each per round, median
of the rounds), together with the machine's float32 `jnp.dot` ceiling, measured before and after.
JAX candidates (`--jax`): layers under `lax.scan` or unrolled, in the 'concat' layout (the same
rows as the PyTorch step) or 'prefix' (prompt-prefix sharing: prompt + chosen + rejected in one
row, the prompt computed once; the same pairs, losses equal). Tokens/s counts every token of the
2N concat rows for every candidate, so for the same pairs it is comparable across layouts. Achieved FLOP/s is given two ways, both the same
FLOP count for every candidate, over its time:
- "model": the issue's definition, 3 x forward for the trained model (+1 forward for an online
  reference), forward = 2 x (matmul params incl. the unembedding) per token + 4 T^2 H Dh per row
  and layer (the full attention square);
- "needed": the work the loss needs: causal attention (half the square) and the unembedding only
  at the completion tokens (the prompt's logits are never used). apo_jax executes about this;
  the PyTorch step executes the full head, so its "needed" share is lower than its "model" one.
The prefix rows do less work for the same pairs: their "model" column says n/a and their "needed"
count is that of their own rows (prompt once, both completions attending to it).
The 'default' candidate is what a user gets without settings: LlamaConfig's defaults (scanned
layers, remat 'none') in the layout config.data.layout=auto picks for these rows.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp
import numpy as np
import torch
from common import (
    STEP_MODEL,
    Shapes,
    build_step,
    concat_batch,
    dot_flops_per_s,
    forward_flops,
    machine,
    median,
    table,
    time_interleaved,
    ts,
)
from torch_step import TorchStep

from apo_jax import layouts

# name: (LlamaConfig overrides, batch layout); 'default' takes LlamaConfig's defaults and the
# layout that config.data.layout=auto picks for these rows (default_layout).
JAX_VARIANTS = {
    "default": ({}, "auto"),
    "scan": (dict(scan_layers=True), "concat"),
    "unrolled": (dict(scan_layers=False), "concat"),
    "prefix-scan": (dict(scan_layers=True), "prefix"),
    "prefix-unrolled": (dict(scan_layers=False), "prefix"),
}


def prefix_batch(concat: dict[str, np.ndarray], shp: Shapes) -> dict[str, np.ndarray]:
    """The same pairs as a 'prefix' batch (prompt + chosen + rejected in one row), via the loader."""
    from apo_jax.data import loader, shards

    n, p = shp.pairs, shp.prompt
    ids = concat["input_ids"]
    items = [
        (i, shards.serialize(shards.PairRecord(ids[i, :p], ids[i, p:], ids[n + i, p:], i)))
        for i in range(n)
    ]
    collate = loader.Collate(
        layouts.get("prefix"),
        layouts.RowSpec(2 * shp.seq - p),
        concat["ref_chosen_logps"],
        concat["ref_rejected_logps"],
    )
    return collate(items)


def default_layout(shp: Shapes, cfg, batch_size: int) -> str:
    """What config.data.layout=auto picks for benchmark rows (every pair the same lengths)."""
    from apo_jax.layouts import auto

    p, c = shp.prompt, shp.seq - shp.prompt
    one = lambda n: {"mean": n, "max": n, "p90": n}  # noqa: E731
    manifest = {
        "settings": {"max_length": shp.seq},
        "lengths": {
            "prompt": one(p),
            "chosen": one(c),
            "rejected": one(c),
            "row_max": one(p + c),
            "prefix_row": one(p + 2 * c),
        },
    }
    return auto.choose(
        manifest,
        seq_len=None,
        buckets=None,
        batch_size=batch_size,
        grad_accum=1,
        data_ways=1,
        process_count=1,
        model_cfg=cfg,
    ).name


def prefix_needed_flops(cfg, shp: Shapes, online: bool) -> float:
    """The "needed" count for prefix rows: N rows of prompt + both completions, the head on the
    completions, attention over the prompt (causal) and each completion (prompt + causal self)."""
    p, c = shp.prompt, shp.seq - shp.prompt
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    body_per_token = cfg.n_layers * (D * Dh * (2 * H + 2 * K) + 3 * D * F)
    head = D * cfg.vocab_size * shp.pairs * 2 * c
    scores = shp.pairs * (p * p / 2 + 2 * (c * p + c * c / 2))
    forward = 2 * (body_per_token * shp.pairs * (p + 2 * c) + head)
    return (3 + online) * (forward + cfg.n_layers * 4 * scores * H * Dh)


def step_flops(cfg, shp: Shapes, online: bool, needed: bool = False) -> float:
    if needed:
        return (3 + online) * forward_flops(cfg, shp, causal=True, head_tokens=shp.seq - shp.prompt)
    return (3 + online) * forward_flops(cfg, shp)


def jax_runner(cfg, step_cfg, batch):
    step, state, ref = build_step(cfg, step_cfg)
    dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], dev_batch, ref)
        metrics["loss"].block_until_ready()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="online,precomputed")
    ap.add_argument(
        "--jax", default="default,scan,unrolled", help=f"comma list of {sorted(JAX_VARIANTS)}"
    )
    ap.add_argument("--chunk", type=int, default=ts.StepConfig().logprob_chunk)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    shp = Shapes(pairs=args.pairs, seq=args.seq, prompt=args.seq // 2)
    batch = concat_batch(shp, STEP_MODEL.vocab_size)
    tokens = 2 * shp.pairs * shp.seq
    ceilings = [dot_flops_per_s()]
    rows = []
    for mode in args.modes.split(","):
        step_cfg = ts.StepConfig(loss="apo_down", reference=mode, logprob_chunk=args.chunk)
        fns = {}
        for v in args.jax.split(","):
            overrides, layout = JAX_VARIANTS[v]
            if layout == "auto":
                layout = default_layout(shp, STEP_MODEL, shp.pairs)
                v = f"default: scan, {layout}"
            fns[f"apo_jax ({v})"] = jax_runner(
                STEP_MODEL.replace(**overrides),
                dataclasses.replace(step_cfg, layout=layouts.get(layout)),
                prefix_batch(batch, shp) if layout == "prefix" else batch,
            )
        if not args.no_torch:
            torch_step = TorchStep(STEP_MODEL, online=mode == "online")
            fns["pytorch (TRL-style)"] = lambda ts_=torch_step: ts_(batch)
        times = time_interleaved(fns, args.repeats)
        flops = step_flops(STEP_MODEL, shp, mode == "online")
        needed = step_flops(STEP_MODEL, shp, mode == "online", needed=True)
        t_torch = median(times["pytorch (TRL-style)"]) if not args.no_torch else float("nan")
        for name, t in times.items():
            # A prefix row does less work for the same pairs: its FLOP columns would not compare.
            fl = (
                (None, prefix_needed_flops(STEP_MODEL, shp, mode == "online"))
                if "prefix" in name
                else (flops, needed)
            )
            rows.append(
                (
                    mode,
                    name,
                    f"{median(t):.2f}",
                    " ".join(f"{x:.2f}" for x in t),
                    f"{tokens / median(t):.0f}",
                    f"{t_torch / median(t):.2f}x",
                    *(f"{f / median(t) / 1e9:.1f}" if f else "n/a" for f in fl),
                    *fl,
                )
            )
    ceilings.append(dot_flops_per_s())
    ceiling = float(np.median(ceilings))
    print(f"machine: {machine()}; torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"shapes: {STEP_MODEL}; pairs {shp.pairs}, seq {shp.seq}, prompt {shp.prompt}")
    print(
        f"float32 jnp.dot 2048^3 ceiling: {' / '.join(f'{c / 1e9:.0f}' for c in ceilings)} GFLOP/s "
        "(before / after)"
    )
    header = (
        "reference",
        "step",
        "s/step (median)",
        "all rounds",
        "tokens/s",
        "vs pytorch",
        "model GFLOP/s",
        "needed GFLOP/s",
        "model % of dot",
        "needed % of dot",
    )
    pct = lambda f, r: f"{100 * f / float(r[2]) / ceiling:.0f}%" if f else "n/a"  # noqa: E731
    out = [r[:-2] + (pct(r[-2], r), pct(r[-1], r)) for r in rows]
    print(table(header, out))


if __name__ == "__main__":
    main()
