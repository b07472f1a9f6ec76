"""Benchmark 9: the reference pass's forward against a PyTorch `no_grad` forward of the same rows.

    python bench/reference_vs_torch.py [--pairs 4] [--seq 512] [--repeats 3] [--chunk 128]

One random Llama-3-architecture model of benchmark 1's shapes (d 512, 8 layers, 8 heads, 2 kv
heads, mlp 1536, vocab 32000, float32) is saved as a Hugging Face checkpoint and loaded by both
sides. The rows are benchmark 1's 'concat' rows (N pairs, 2N rows of `--seq` tokens, half prompt).
apo_jax runs what `python -m apo_jax.reference` runs per batch
(`apo_jax.reference.compute_and_store`): one jitted `Concat.pair_logps` over the whole batch,
forward only. PyTorch runs what TRL does to precompute reference log-probs: `LlamaForCausalLM`
in eval mode under `torch.no_grad()`, full float32 logits, `selective_log_softmax` and masked
sums (`bench/torch_step.py`). Both sides float32; tokens/s counts all 2N x T tokens; medians of
interleaved rounds after a warm-up; the two sides' summed log-probs are compared.
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import STEP_MODEL, Shapes, concat_batch, machine, median, table, time_interleaved
from torch_step import concatenated_logps, hf_llama

from apo_jax import layouts
from apo_jax.models.hf import load_hf


def jax_runner(path: str, batch: dict[str, np.ndarray], chunk: int):
    """The reference pass's compiled forward on `batch`; returns (run, log-probs [2N])."""
    model, _ = load_hf(path)
    from flax import nnx

    graphdef, params = nnx.split(model)
    concat = layouts.get("concat")
    fn = jax.jit(functools.partial(concat.pair_logps, graphdef, chunk=chunk))
    dev = {k: jnp.asarray(v) for k, v in batch.items()}

    def run():
        return jax.block_until_ready(fn(params, dev))

    sides = run()
    return run, np.concatenate([np.asarray(sides.chosen), np.asarray(sides.rejected)])


def torch_runner(model, batch: dict[str, np.ndarray]):
    ids = torch.from_numpy(batch["input_ids"]).long()
    comp = torch.from_numpy(batch["completion_mask"])

    def run():
        with torch.no_grad():
            return concatenated_logps(model, ids, comp)

    return run, run().numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()
    shp = Shapes(pairs=args.pairs, seq=args.seq, prompt=args.seq // 2)
    batch = concat_batch(shp, STEP_MODEL.vocab_size)
    model = hf_llama(STEP_MODEL).eval()
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        jax_run, jax_logps = jax_runner(path, batch, args.chunk)
    torch_run, torch_logps = torch_runner(model, batch)
    rel = float(np.max(np.abs(jax_logps - torch_logps) / np.abs(torch_logps)))
    times = time_interleaved(
        {"apo_jax reference pass": jax_run, "pytorch no_grad": torch_run}, args.repeats
    )
    tokens = 2 * shp.pairs * shp.seq
    t_torch = median(times["pytorch no_grad"])
    rows = [
        (
            name,
            f"{median(t):.3f}",
            " ".join(f"{x:.2f}" for x in t),
            f"{tokens / median(t):.0f}",
            f"{t_torch / median(t):.2f}x",
        )
        for name, t in times.items()
    ]
    print(f"machine: {machine()}; torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"shapes: {STEP_MODEL}; pairs {shp.pairs}, seq {shp.seq}, prompt {shp.prompt}")
    print(f"summed log-probs, max relative difference between the sides: {rel:.1e}")
    header = ("forward", "s/batch (median)", "all rounds", "tokens/s", "vs pytorch")
    print(table(header, rows))


if __name__ == "__main__":
    main()
