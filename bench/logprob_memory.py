"""Benchmark 4: compiled temporary memory of the log-prob head, chunked against naive.

    python bench/logprob_memory.py [--rows 16] [--seq 4096] [--vocab 128256] [--d 4096]

Forward+backward (gradients with respect to the hidden states and the unembedding) of the summed
completion log-probs, compiled ahead of time from abstract shapes (nothing is allocated), for
`apo_jax.logprobs.sequence_logps` at several chunk sizes and for `naive_sequence_logps` (full
[B, T, V] float32 logits). Reports XLA's `memory_analysis()` temp bytes (the live scratch beyond
arguments and outputs). Target: chunked <= 1/8 of naive.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from common import machine, table

from apo_jax.logprobs import naive_sequence_logps, sequence_logps

GiB = 2**30


def compiled_memory(fn, shapes):
    def loss(h, w, ids, mask):
        return jnp.sum(fn(h, w, ids, mask)[0])

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    mem = compiled.memory_analysis()
    return mem, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", help="hidden/unembedding dtype")
    ap.add_argument("--chunks", default="128,256,512,1024")
    args = ap.parse_args()
    dt = jnp.dtype(args.dtype)
    B, T, V, D = args.rows, args.seq, args.vocab, args.d
    shapes = (
        jax.ShapeDtypeStruct((B, T, D), dt),
        jax.ShapeDtypeStruct((D, V), dt),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    )
    candidates = {"naive (full logits)": naive_sequence_logps}
    for c in args.chunks.split(","):
        candidates[f"chunked, chunk {c}"] = functools.partial(sequence_logps, chunk_size=int(c))
    rows, naive_temp = [], None
    for name, fn in candidates.items():
        mem, secs = compiled_memory(fn, shapes)
        temp = mem.temp_size_in_bytes
        naive_temp = naive_temp or temp
        rows.append(
            (
                name,
                f"{temp / GiB:.2f}",
                f"{mem.argument_size_in_bytes / GiB:.2f}",
                f"{mem.output_size_in_bytes / GiB:.2f}",
                f"{naive_temp / temp:.1f}x",
                f"{secs:.1f}",
            )
        )
    print(f"machine: {machine()}")
    print(f"forward+backward of summed log-probs: {B} rows x {T} tokens, D {D}, V {V}, {dt.name}")
    print(table(("head", "temp GiB", "args GiB", "outputs GiB", "naive / this", "compile s"), rows))


if __name__ == "__main__":
    main()
