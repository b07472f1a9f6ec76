"""Data pipeline throughput: prepare (pairs/s, scaling with workers) and loader (batches/s).

Run: ``python bench/bench_data.py [--pairs 4000] [--workers 0 1 2 4] [--batches 50]``.
Prepare runs on generated demo pairs with the demo tokenizer; the loader runs on synthetic shards
with Llama-3-8B-like rows (prompt + completion up to 4096 tokens, 8 pairs per batch).
Numbers depend on the machine and its load: compare rows of one run, not runs on other machines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from apo_jax import layouts
from apo_jax.data import demo, loader, prepare, shards


def bench_prepare(tmp: str, n_pairs: int, workers_list: list[int]) -> list[dict]:
    """Times prepare on n_pairs generated pairs for each worker count."""
    rows = demo.generate_pairs(n_pairs, seed=0)
    texts = [m["content"] for r in rows[:2000] for side in ("chosen", "rejected") for m in r[side]]
    tok_dir = demo.train_tokenizer(texts, os.path.join(tmp, "tok"))
    path = os.path.join(tmp, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    prepare.prepare(
        path, tok_dir, os.path.join(tmp, "warm"), prepare.Settings(max_length=256)
    )  # warm caches
    out = []
    for w in workers_list:
        t0 = time.perf_counter()
        m = prepare.prepare(
            path, tok_dir, os.path.join(tmp, f"w{w}"), prepare.Settings(max_length=256, workers=w)
        )
        dt = time.perf_counter() - t0
        rate = m["counts"]["written"] / dt
        out.append(
            {
                "workers": w,
                "seconds": dt,
                "pairs_per_s": rate,
                "per_worker": rate / max(w, 1),
                "fingerprint": m["shard_fingerprint"][:12],
            }
        )
    return out


def synthetic_shards(
    out_dir: str, n: int, max_length: int = 4096, vocab: int = 128_256, seed: int = 0
) -> str:
    """Writes n random pairs with Llama-3-8B-like lengths and a minimal manifest."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    writer = shards.ShardWriter(out_dir, records_per_shard=256)
    longest = 0
    for i in range(n):
        p = int(rng.integers(256, 2048))
        c, r = (int(rng.integers(64, max_length - p)) for _ in range(2))
        ids = [rng.integers(0, vocab, k, dtype=np.int32) for k in (p, c, r)]
        writer.write(shards.PairRecord(*ids, source_index=i))
        longest = max(longest, p + c + r)
    writer.close()
    manifest = {
        "settings": {"max_length": max_length},
        "tokenizer": {"pad_id": 0},
        "counts": {"written": n},
        "lengths": {"prefix_row": {"max": longest}},
    }
    with open(os.path.join(out_dir, shards.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return out_dir


def bench_loader(shard_dir: str, n_batches: int) -> list[dict]:
    """Times batches/s for the concat and prefix layouts, with and without grain workers."""
    out = []
    for layout, seq_len in (("concat", 4096), ("prefix", 8192)):
        for workers in (0, 2):
            cfg = loader.LoaderConfig(
                batch_size=8,
                seq_len=seq_len,
                layout=layouts.get(layout),
                worker_count=workers,
                seed=0,
            )
            ld = loader.make_loader(shard_dir, cfg, process_index=0, process_count=1)
            next(ld)  # start-up (worker spawn) is not throughput
            t0 = time.perf_counter()
            for _ in range(n_batches):
                b = next(ld)
            dt = time.perf_counter() - t0
            shape = "x".join(map(str, b["input_ids"].shape))
            out.append(
                {
                    "layout": layout,
                    "workers": workers,
                    "shape": shape,
                    "batches_per_s": n_batches / dt,
                    "tokens_per_s": n_batches * b["input_ids"].size / dt,
                }
            )
    return out


def main() -> None:
    """Runs both benchmarks and prints tables."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument(
        "--records", type=int, default=512, help="synthetic records for the loader bench"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"prepare: {args.pairs} demo pairs, max_length 256 (cpu count {os.cpu_count()})")
        print(f"{'workers':>8} {'seconds':>8} {'pairs/s':>9} {'pairs/s/worker':>15} {'output':>13}")
        for r in bench_prepare(tmp, args.pairs, args.workers):
            print(
                f"{r['workers']:>8} {r['seconds']:>8.2f} {r['pairs_per_s']:>9.0f} {r['per_worker']:>15.0f} "
                f"{r['fingerprint']:>13}"
            )
        shard_dir = synthetic_shards(os.path.join(tmp, "synth"), args.records)
        print(
            f"\nloader: {args.records} synthetic records, 8 pairs per batch, {args.batches} batches"
        )
        print(f"{'layout':>8} {'workers':>8} {'input_ids':>11} {'batches/s':>10} {'Mtokens/s':>10}")
        for r in bench_loader(shard_dir, args.batches):
            print(
                f"{r['layout']:>8} {r['workers']:>8} {r['shape']:>11} {r['batches_per_s']:>10.1f} "
                f"{r['tokens_per_s'] / 1e6:>10.1f}"
            )


if __name__ == "__main__":
    main()
