"""Benchmark 10: scanned layers against unrolled ones, and the scan's compile time at Llama-3-8B.

    python bench/scan_layers.py [--rows 4] [--repeats 3] [--compile-8b]

At benchmark 1's widths (d 512, 8 layers, 8 heads, 2 kv heads, mlp 1536, vocab 32000, float32),
forward+backward of the decoder body (`Llama(..., return_hidden=True)`, loss sum(sin(h))) over
`--rows` rows of 512 tokens, remat 'none', timed interleaved (median of the rounds):
- unrolled: `scan_layers=False`;
- scan: `scan_layers=True`, as the model runs it (remat 'none' under the scan keeps the matmul
  outputs and recomputes element-wise ops and data movement, `models.llama._remat`);
- scan, keep all: the scan saving every value the backward uses (what remat 'none' did under
  the scan before), for comparison.
Also per candidate: XLA's compiled temp memory and the number of zero-filled stacked buffers
(`copy(wrapped_broadcast)` in the optimized HLO). `--compile-8b`: lower and compile the
llama3_8b preset's body forward+backward (bfloat16, remat 'none', 1 x 1024 tokens, abstract
weights) for both scan candidates; compile seconds and temp GiB.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from common import STEP_MODEL, machine, median, table, time_interleaved
from flax import nnx

from apo_jax.models import llama
from apo_jax.models.config import get_preset

T = 512
CANDIDATES = {"unrolled": (False, False), "scan": (True, False), "scan, keep all": (True, True)}


def _keep_all(fn, policy, scanned):
    del policy, scanned
    return fn


def compiled_body(cfg, ids, params_or_shapes, keep_all: bool):
    """The jitted body gradient, compiled; with `keep_all` the layers save every residual."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))

    def loss(params):
        hidden = nnx.merge(graphdef, params)(ids, return_hidden=True)
        return jnp.sum(jnp.sin(hidden.astype(jnp.float32)))

    remat = llama._remat
    llama._remat = _keep_all if keep_all else remat
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(jax.grad(loss)).lower(params_or_shapes).compile()
        return compiled, time.perf_counter() - t0
    finally:
        llama._remat = remat


def speed(rows: int, repeats: int) -> list[tuple]:
    ids = jax.random.randint(jax.random.key(2), (rows, T), 1, STEP_MODEL.vocab_size)
    fns, info = {}, {}
    for name, (scan, keep_all) in CANDIDATES.items():
        cfg = STEP_MODEL.replace(scan_layers=scan)
        params = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))[1]
        compiled, secs = compiled_body(cfg, ids, params, keep_all)
        stacked = compiled.as_text().count("copy(%wrapped_broadcast")
        info[name] = (compiled.memory_analysis().temp_size_in_bytes / 2**20, stacked, secs)
        fns[name] = lambda c=compiled, p=params: jax.block_until_ready(c(p))
    times = time_interleaved(fns, repeats)
    base = median(times["unrolled"])
    return [
        (
            name,
            f"{median(t):.2f}",
            " ".join(f"{x:.2f}" for x in t),
            f"{base / median(t):.2f}x",
            f"{info[name][0]:.0f}",
            info[name][1],
            f"{info[name][2]:.1f}",
        )
        for name, t in times.items()
    ]


def compile_8b() -> list[tuple]:
    cfg = get_preset("llama3_8b", remat="none", dtype="bfloat16")
    model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.split(model, nnx.Param, ...)[1]
    )
    ids = jnp.ones((1, 1024), jnp.int32)
    out = []
    for name, keep_all in (("scan", False), ("scan, keep all", True)):
        compiled, secs = compiled_body(cfg, ids, params, keep_all)
        gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
        out.append((name, f"{secs:.1f}", f"{gib:.2f}"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-8b", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}; rows {args.rows} x {T} tokens, {STEP_MODEL}")
    header = (
        "body fwd+bwd",
        "s (median)",
        "all rounds",
        "vs unrolled",
        "temp MiB",
        "stacked buffers",
        "compile s",
    )
    print(table(header, speed(args.rows, args.repeats)))
    if args.compile_8b:
        print("llama3_8b body forward+backward, bfloat16, 1 x 1024 tokens, remat none:")
        print(table(("layers", "compile s", "temp GiB"), compile_8b()))


if __name__ == "__main__":
    main()
