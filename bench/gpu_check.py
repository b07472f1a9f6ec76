"""Benchmark 6 (driver: bench/gpu.sh): GPU parity, llama3_1b step throughput and MFU, 8B memory.

    python bench/gpu_check.py [--dry] [--budget-s 420]

1. The GPU forward of a small float32 Llama against the same weights' CPU forward (max |diff| of
   the logits, tolerance 2e-3 with TF32 off).
2. The `llama3_1b` preset's APO-down train step (precomputed reference, bfloat16 compute, float32
   master weights, AdamW, remat 'full'), sequence 2048: the largest pairs-per-step from the list
   whose compiled memory fits the card, timed (median of 5 after warm-up); tokens/s and MFU against
   the bf16 dense peak (H100/H200 SXM: 989 TFLOP/s), model FLOPs = 3 x forward (no recomputation).
3. Per-device memory of the `llama3_8b` step from `bench/llama8b_memory.py` (8 simulated CPU
   devices, seq 4096, 2 pairs/device; XLA:CPU's estimate, not the GPU's).
`--dry`: tiny shapes on CPU, to check the script end to end where no GPU is lent.
Imports only jax, flax, optax, numpy and apo_jax's model/step modules (no grain, array-record,
ml-collections or datasets).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import Shapes, build_step, concat_batch, median, table, time_interleaved, ts
from flax import nnx
from step_vs_torch import forward_flops

from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def parity(dry: bool) -> tuple[float, bool]:
    cfg = get_preset("tiny", vocab_size=1024, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2,
                     head_dim=32, mlp_dim=512)  # fmt: skip
    model = Llama(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (2, 128)), jnp.int32)
    cpu = jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
        g, s = nnx.split(model)
        s_cpu, ids_cpu = jax.device_put((s, ids), cpu)
        ref = np.asarray(jax.jit(lambda s, x: nnx.merge(g, s)(x), device=cpu)(s_cpu, ids_cpu))
    diff = float(np.max(np.abs(out - ref)))
    return diff, diff < 2e-3


def step_time(cfg, pairs: int, seq: int, repeats: int):
    shp = Shapes(pairs=pairs, seq=seq, prompt=seq // 2)
    step, state, _ = build_step(cfg, ts.StepConfig(reference="precomputed", logprob_chunk=512))
    batch = {k: jnp.asarray(v) for k, v in concat_batch(shp, cfg.vocab_size).items()}
    compiled = step.lower(state, batch, None).compile()
    mem = compiled.memory_analysis()
    holder = [state]

    def run():
        holder[0], m = compiled(holder[0], batch, None)
        m["loss"].block_until_ready()

    t = time_interleaved({"s": run}, repeats, warmup=2)["s"]
    return median(t), mem, shp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--pairs", default="16,8,4,2,1", help="pairs per step to try, largest first")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}", flush=True)
    if not args.dry and dev.platform != "gpu":
        sys.exit("no GPU: run with --dry")
    diff, ok = parity(args.dry)
    print(
        f"parity: max |logits_gpu - logits_cpu| = {diff:.2e} -> {'OK' if ok else 'FAIL'}",
        flush=True,
    )

    if args.dry:
        cfg, seq, repeats = get_preset("tiny", dtype="bfloat16", remat="full"), 64, 2
    else:
        cfg, seq, repeats = get_preset("llama3_1b", remat="full"), 2048, 5
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), 989e12)
    rows = []
    for pairs in map(int, args.pairs.split(",")):
        try:
            secs, mem, shp = step_time(cfg, pairs, seq, repeats)
        except Exception as e:  # noqa: BLE001 - out of memory at compile or run: try fewer pairs
            print(f"{pairs} pairs: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        tokens = 2 * pairs * seq
        flops = 3 * forward_flops(cfg, shp)
        rows.append((cfg.n_layers, seq, pairs, f"{secs * 1e3:.1f}", f"{tokens / secs:.0f}",
                     f"{flops / secs / 1e12:.1f}", f"{100 * flops / secs / peak:.1f}%",
                     f"{(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30:.1f}"))  # fmt: skip
        print(rows[-1], flush=True)
        break
    print(table(("layers", "seq", "pairs", "ms/step", "tokens/s", "TFLOP/s", "MFU vs 989 TFLOP/s",
                 "GiB (args+temp)"), rows))  # fmt: skip

    mem_args = ["--seqs", "4096", "--pairs", "2", "--remat", "full"]
    if args.dry:
        mem_args = ["--preset", "tiny", "--seqs", "256", "--pairs", "1", "--remat", "full"]
    env = {"JAX_PLATFORMS": "cpu"}
    import os

    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "llama8b_memory.py"),
                    *mem_args], check=False, env={**os.environ, **env})  # fmt: skip
    print(f"llama8b_memory took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
