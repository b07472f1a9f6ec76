"""Where the real model's train step spends its time: step variants timed interleaved, in-process.

    python bench/profile_step.py --shards DIR [--model /work/models/smollm2-hf] [--batch 8]
        [--variants packed,prefix,concat] [--repeats 3] [--lora 0] [--trace DIR] [--ops 20]

The step is the train command's (`train_step.train_step`, APO-zero, AdamW with clipping, stored
reference log-probs) on the first `--batch` pairs of prepared shards, each variant compiled once
and then timed interleaved (median of `--repeats`). A variant is `layout[:key=value...]` with keys
`remat` (none | full | save_dots), `chunk` (log-prob chunk), `scan` (0 | 1) and `head` (flat | rows: the log-prob head's
chunks over the batch's flattened positions, or per row as before) and `piece` (step |
grads | fwd: the whole step, only loss and gradients, only the loss). `--trace` writes a
`jax.profiler` trace of one call of each variant (open with TensorBoard or Perfetto); `--ops N`
prints each variant's time per kind of XLA instruction and its N costliest sources
(`bench/op_profile.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, median, table, time_interleaved

from apo_jax import layouts, logprobs
from apo_jax.data import loader
from apo_jax.data import shards as shards_lib
from apo_jax.models import hf
from apo_jax.optim import OptimConfig, make_optimizer
from apo_jax.train import train_step as ts


def records(shard_dir: str, n: int) -> list[tuple[int, bytes]]:
    from array_record.python.array_record_module import ArrayRecordReader

    out: list[tuple[int, bytes]] = []
    for path in sorted(glob.glob(os.path.join(shard_dir, shards_lib.SHARD_PATTERN))):
        reader = ArrayRecordReader(path)
        out += [(len(out) + i, b) for i, b in enumerate(reader.read_all())]
        reader.close()
    return out[:n]


@contextlib.contextmanager
def _head(kind: str):
    """head=rows: the log-prob head as before the flat chunks (each row's needed positions at its
    own front, chunks of chunk_size time steps of every row), for comparison."""
    if kind == "flat":
        yield
        return

    def rows(hidden, unembed, targets, *, chunk_size=128, where_BxT=None):
        return logprobs._head_positions(hidden, unembed, targets, where_BxT, chunk_size)

    from apo_jax.layouts import packed, packed_prefix

    mods = (logprobs, packed, packed_prefix)
    saved = [m.token_logps for m in mods]
    for m in mods:
        m.token_logps = rows
    try:
        yield
    finally:
        for m, fn in zip(mods, saved, strict=True):
            m.token_logps = fn


def parse(variant: str) -> tuple[str, dict[str, str]]:
    layout, *kvs = variant.split(":")
    return layout, dict(kv.split("=") for kv in kvs)


def build(variant: str, model_dir: str, items, lora: int):
    layout_name, opts = parse(variant)
    overrides = {}
    if "remat" in opts:
        overrides["remat"] = opts["remat"]
    if "scan" in opts:
        overrides["scan_layers"] = bool(int(opts["scan"]))
    model, cfg = hf.load_hf(model_dir, **overrides)
    frozen = None
    if lora:
        from apo_jax.models import lora as lora_lib

        lora_lib.attach(model, lora_lib.LoraConfig(rank=lora), seed=0)
        graphdef, params, frozen = lora_lib.split(model)
    else:
        graphdef, params = ts.split_model(model)
    layout = layouts.get(layout_name)
    spec = layouts.RowSpec(int(opts.get("seq", 128)))
    n = len(items)
    rng = np.random.default_rng(0)
    refs = [(rng.normal(size=n) - 50).astype(np.float32) for _ in range(2)]
    collate = loader.Collate(layout, spec, *refs)
    batch = {k: jnp.asarray(v) for k, v in collate(items).items()}
    scfg = ts.StepConfig(
        loss="apo_zero",
        reference="precomputed",
        layout=layout,
        logprob_chunk=int(opts.get("chunk", 128)),
    )
    tx, sched = make_optimizer(OptimConfig(learning_rate=1e-4, schedule="constant"), 1000)
    state = jax.tree.map(jnp.copy, ts.init_state(params, tx, 0))
    piece = opts.get("piece", "step")
    if piece == "step":
        fn = functools.partial(ts.train_step, graphdef=graphdef, tx=tx, cfg=scfg, schedule=sched)
        step = jax.jit(lambda s, b, f: fn(s, b, None, f), donate_argnums=(0,))
    else:

        def g(s, b, f):
            out = ts._grads(s, graphdef, b, scfg, None, None, f)
            return out if piece == "grads" else out[1]

        step = jax.jit(g)
    t0 = time.perf_counter()
    with _head(opts.get("head", "flat")):
        exe = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
        out = exe(holder[0], batch, frozen)
        if piece == "step":
            holder[0] = out[0]
        jax.block_until_ready(out)

    run.compiled = exe
    return run, compile_s, {k: tuple(v.shape) for k, v in batch.items() if k == "input_ids"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--model", default="/work/models/smollm2-hf")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="packed,prefix,concat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--trace", default="")
    ap.add_argument("--ops", type=int, default=0, help="per-op tables of each variant, top N ops")
    args = ap.parse_args()
    items = records(args.shards, args.batch)
    fns, info = {}, {}
    for v in args.variants.split(","):
        fns[v], compile_s, shape = build(v, args.model, items, args.lora)
        info[v] = (compile_s, shape)
        print(f"# {v}: compiled in {compile_s:.1f} s, rows {shape}", flush=True)
    load0 = os.getloadavg()[0]
    times = time_interleaved(fns, args.repeats)
    if args.trace:
        with jax.profiler.trace(args.trace):
            for fn in fns.values():
                fn()
    base = median(next(iter(times.values())))
    rows = [
        (
            v,
            info[v][1]["input_ids"],
            f"{median(t):.2f}",
            " ".join(f"{x:.2f}" for x in t),
            f"{base / median(t):.2f}x",
            f"{info[v][0]:.1f}",
        )
        for v, t in times.items()
    ]
    print(
        f"machine: {machine()}; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"{args.batch} pairs, lora {args.lora}"
    )
    print(table(("variant", "rows", "s (median)", "all rounds", "vs first", "compile s"), rows))
    if args.ops:
        from op_profile import traced_ops

        for v, fn in fns.items():
            print(f"\n### per-op time of {v} (2 calls traced)\n")
            print(traced_ops(fn.compiled, fn, calls=2, top=args.ops), flush=True)


if __name__ == "__main__":
    main()
