"""Benchmark 5: prompt-prefix sharing against the concat layout, whole train step.

    python bench/prefix_sharing.py [--prompts 128,512,1536] [--completion 256] [--repeats 2]

The same pairs go through the loader's collate in both layouts ('concat': 2 rows of
prompt + completion; 'prefix': 1 row of prompt + chosen + rejected) and through a jitted APO-down
train step (precomputed reference, AdamW); the concat step uses `train_step.pair_logps`, the prefix
step `train_step.pair_logps` with `StepConfig(layout=layouts.get('prefix'))`. The two are timed interleaved (median of the rounds).
Model: benchmark 1's shapes with `--layers` layers (default 4, to keep the run short).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from common import STEP_MODEL, machine, median, table, time_interleaved, ts

from apo_jax import layouts
from apo_jax.data import loader, shards


def pair_batches(n: int, prompt: int, completion: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        p, c, r = (
            rng.integers(1, vocab, k).astype(np.int32) for k in (prompt, completion, completion)
        )
        items.append((i, shards.serialize(shards.PairRecord(p, c, r, i))))
    refs = np.full(n, -700.0, np.float32)
    out = {}
    for layout, t in (("concat", prompt + completion), ("prefix", prompt + 2 * completion)):
        collate = loader.Collate(layouts.get(layout), layouts.RowSpec(t), refs, refs)
        out[layout] = {k: jnp.asarray(v) for k, v in collate(items).items()}
    return out


def runner(cfg, step_cfg, batch, prefix: bool):
    from flax import nnx

    from apo_jax.models.llama import Llama
    from apo_jax.optim import OptimConfig, make_optimizer

    graphdef, params = ts.split_model(Llama(cfg, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-6, schedule="constant"), 1000)
    state = jax.tree.map(jnp.copy, ts.init_state(params, tx, 0))

    step_cfg = dataclasses.replace(step_cfg, layout=layouts.get("prefix" if prefix else "concat"))

    def fn(state, batch):
        return ts.train_step(state, batch, None, graphdef=graphdef, tx=tx, cfg=step_cfg)

    step = jax.jit(fn, donate_argnums=(0,))
    holder = [state]

    def run():
        holder[0], m = step(holder[0], batch)
        m["loss"].block_until_ready()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="128,512,1536")
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=ts.StepConfig().logprob_chunk)
    args = ap.parse_args()
    cfg = STEP_MODEL.replace(n_layers=args.layers, max_seq_len=8192)
    step_cfg = ts.StepConfig(loss="apo_down", reference="precomputed", logprob_chunk=args.chunk)
    rows = []
    for prompt in map(int, args.prompts.split(",")):
        b = pair_batches(args.pairs, prompt, args.completion, cfg.vocab_size)
        fns = {lay: runner(cfg, step_cfg, b[lay], lay == "prefix") for lay in ("concat", "prefix")}
        times = time_interleaved(fns, args.repeats)
        tc, tp = median(times["concat"]), median(times["prefix"])
        toks = {k: int(b[k]["segment_ids"].sum()) for k in b}
        rows.append(
            (
                prompt,
                args.completion,
                toks["concat"],
                toks["prefix"],
                f"{tc:.2f}",
                f"{tp:.2f}",
                f"{tc / tp:.2f}x",
            )
        )
        print(rows[-1], flush=True)
    print(
        f"machine: {machine()}; model {cfg.n_layers} layers, d {cfg.d_model}, V {cfg.vocab_size}; "
        f"{args.pairs} pair(s) per step, float32"
    )
    header = (
        "prompt",
        "completion",
        "concat tokens",
        "prefix tokens",
        "concat s/step",
        "prefix s/step",
        "speedup",
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
