"""Benchmark 3: does a preset's APO train step fit? Ahead-of-time compile on 8 simulated devices.

    python bench/llama8b_memory.py [--preset llama3_8b[,qwen3_8b,...]] [--seqs 2048,4096,8192]
        [--pairs 1,2,4] [--remat save_dots,full] [--attention xla|blocked]

Any `apo_jax.models.config.PRESETS` name works (Llama, Qwen2.5, Qwen3, Mistral, Gemma 3); a
comma list compiles each in turn and prints one table.

No weights exist: the model, optimizer state and batch are abstract (`nnx.eval_shape`,
`jax.eval_shape`, `jax.ShapeDtypeStruct`) with their shardings on an 8-device FSDP mesh
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set here before jax loads). The step is the
project's `train_step` (APO-down, precomputed reference, bfloat16 compute, float32 master weights,
AdamW with clipping), lowered and compiled for each (sequence length, pairs per device, remat
policy); `memory_analysis()` gives per-device bytes. Fits = arguments + outputs - aliased (donated)
+ temp within the card's memory (80 GiB H100, 95 GiB TPU v5p), with 2 GiB left for the runtime.
Note: XLA:CPU schedules buffers differently from XLA:GPU/TPU; treat the figures as an estimate.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import machine, table  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from apo_jax import sharding  # noqa: E402
from apo_jax.models.config import get_preset  # noqa: E402
from apo_jax.models.llama import Llama  # noqa: E402
from apo_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from apo_jax.train import steps  # noqa: E402
from apo_jax.train import train_step as ts  # noqa: E402

GiB = 2**30
CARDS = (("H100 80 GiB", 80), ("TPU v5p 95 GiB", 95))
HEADROOM_GIB = 2.0


def abstract_state(cfg, tx, mesh):
    """(graphdef, abstract TrainState with shardings attached, its shardings)."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param, ...)[:2]
    params_sh = sharding.param_shardings(params, mesh)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, params_sh
    )
    state_sh = steps.state_shardings(params, tx, mesh)  # moments laid out like params
    state = jax.eval_shape(lambda p: ts.init_state(p, tx, 0), params)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh
    )
    return graphdef, state, state_sh


def abstract_batch(pairs_total: int, seq: int, mesh):
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rows2 = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))

    def s(shape, dtype, sh):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    r = 2 * pairs_total
    batch = {
        k: s((r, seq), jnp.int32, rows2)
        for k in ("input_ids", "completion_mask", "positions", "segment_ids")
    }
    batch["index"] = s((pairs_total,), jnp.int32, rows)
    batch["ref_chosen_logps"] = s((pairs_total,), jnp.float32, rows)
    batch["ref_rejected_logps"] = s((pairs_total,), jnp.float32, rows)
    return batch


def compile_one(cfg, seq, pairs_per_device, mesh, chunk):
    tx, sched = make_optimizer(OptimConfig(learning_rate=1e-6, weight_decay=0.0), 1000)
    graphdef, state, state_sh = abstract_state(cfg, tx, mesh)
    batch = abstract_batch(pairs_per_device * mesh.size, seq, mesh)
    step_cfg = ts.StepConfig(loss="apo_down", reference="precomputed", logprob_chunk=chunk)
    fn = functools.partial(ts.train_step, graphdef=graphdef, tx=tx, cfg=step_cfg, schedule=sched)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(fn, out_shardings=(state_sh, replicated), donate_argnums=(0,))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, batch).compile()
    secs = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return m, total, secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="2048,4096,8192")
    ap.add_argument("--pairs", default="1,2,4", help="pairs per device")
    ap.add_argument("--remat", default="full", help="comma list of none, full, save_dots")
    ap.add_argument("--chunk", type=int, default=ts.StepConfig().logprob_chunk)
    ap.add_argument("--preset", default="llama3_8b", help="comma list of models/config.py presets")
    ap.add_argument(
        "--attention",
        default="xla",
        help="xla (default: what a GPU/TPU compile without cuDNN runs; CPU's 'auto' "
        "would pick blocked) | blocked",
    )
    args = ap.parse_args()
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    rows = []
    for preset in args.preset.split(","):
        for remat in args.remat.split(","):
            cfg = get_preset(preset, remat=remat, scan_layers=True, attention=args.attention)
            for seq in map(int, args.seqs.split(",")):
                for ppd in map(int, args.pairs.split(",")):
                    m, total, secs = compile_one(cfg, seq, ppd, mesh, args.chunk)
                    fits = [
                        ("yes" if total / GiB + HEADROOM_GIB <= cap else "no") for _, cap in CARDS
                    ]
                    rows.append(
                        (
                            preset,
                            f"{cfg.n_params / 1e9:.2f}",
                            remat,
                            seq,
                            ppd,
                            2 * ppd * seq,
                            f"{(m.argument_size_in_bytes - m.alias_size_in_bytes) / GiB:.1f}",
                            f"{m.temp_size_in_bytes / GiB:.1f}",
                            f"{total / GiB:.1f}",
                            *fits,
                            f"{secs:.0f}",
                        )
                    )
                    print(rows[-1], flush=True)
    print(
        f"machine: {machine()}; mesh {dict(mesh.shape)}; bf16 compute, f32 master weights + "
        f"AdamW, log-prob chunk {args.chunk}, attention {args.attention}"
    )
    header = (
        "preset",
        "params B",
        "remat",
        "seq",
        "pairs/device",
        "tokens/device",
        "args-donated GiB",
        "temp GiB",
        "total GiB/device",
        *(f"fits {n}" for n, _ in CARDS),
        "compile s",
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
