"""LoRA vs full fine-tuning: Llama-3-8B memory on one device, and CPU step time.

    python bench/lora_memory.py [--seqs 2048,4096] [--pairs 1] [--rank 16] [--skip_time]

Memory: nothing runs and no weights exist. For each (sequence length, pairs) the project's
`train_step` (APO-down, bfloat16 compute, remat full, AdamW with clipping) is lowered and compiled
ahead of time for one device with abstract inputs, and `memory_analysis()` gives its bytes:
arguments + outputs - aliased (donated) + temp. Three runs are compared:
  - full: every parameter trains, float32 master weights and AdamW moments (the paper's setting
    needs stored reference log-probs, 'precomputed');
  - lora: rank-`--rank` adapters on q,k,v,o,gate,up,down trained in float32 with AdamW, the base
    frozen in bfloat16, reference precomputed;
  - lora online: the same with the online reference, which is the base with its adapters off (the
    same arrays, no second copy).
XLA:CPU schedules buffers differently from XLA:GPU; treat the figures as estimates.

Time: the median CPU step time of full vs LoRA (rank `--rank`, float32 everywhere) at benchmark
1's shapes (`common.STEP_MODEL`, `common.Shapes()`), interleaved repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from common import STEP_MODEL, Shapes, concat_batch, machine, median, table, time_interleaved
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apo_jax import sharding
from apo_jax.models import lora
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.optim import OptimConfig, make_optimizer
from apo_jax.train import steps
from apo_jax.train import train_step as ts

GiB = 2**30


def _with_sharding(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_parts(cfg, rank: int, tx, mesh):
    """(graphdef, abstract state, its shardings, abstract frozen base or None, base graphdef)."""

    def build():
        model = Llama(cfg, rngs=nnx.Rngs(0))
        if rank:
            lora.attach(model, lora.LoraConfig(rank=rank), seed=0)
        return model

    model = nnx.eval_shape(build)
    if rank:
        graphdef, params, frozen = lora.split(model)
        frozen = _with_sharding(frozen, sharding.param_shardings(frozen, mesh))
        base_graphdef = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0]
    else:
        graphdef, params = nnx.split(model, nnx.Param, ...)[:2]
        frozen, base_graphdef = None, graphdef
    params_sh = sharding.param_shardings(params, mesh)
    params = _with_sharding(params, params_sh)
    state_sh = steps.state_shardings(params, tx, mesh)  # moments laid out like params
    state = _with_sharding(jax.eval_shape(lambda p: ts.init_state(p, tx, 0), params), state_sh)
    return graphdef, state, state_sh, frozen, base_graphdef


def abstract_batch(pairs: int, seq: int, mesh):
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rows2 = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    s = jax.ShapeDtypeStruct
    batch = {
        k: s((2 * pairs, seq), jnp.int32, sharding=rows2)
        for k in ("input_ids", "completion_mask", "positions", "segment_ids")
    }
    batch["index"] = s((pairs,), jnp.int32, sharding=rows)
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        batch[k] = s((pairs,), jnp.float32, sharding=rows)
    return batch


def compile_memory(preset: str, rank: int, reference: str, seq: int, pairs: int, mesh):
    """(memory analysis, total bytes, compile seconds) of one step."""
    param_dtype = "bfloat16" if rank else "float32"
    cfg = get_preset(
        preset,
        dtype="bfloat16",
        param_dtype=param_dtype,
        remat="full",
        scan_layers=True,
        attention="xla",
    )
    tx, sched = make_optimizer(OptimConfig(learning_rate=1e-4), 1000)
    graphdef, state, state_sh, frozen, base_graphdef = abstract_parts(cfg, rank, tx, mesh)
    step_cfg = ts.StepConfig(loss="apo_down", reference=reference)
    fn = functools.partial(
        ts.train_step,
        graphdef=graphdef,
        tx=tx,
        cfg=step_cfg,
        schedule=sched,
        ref_graphdef=base_graphdef,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(fn, out_shardings=(state_sh, replicated), donate_argnums=(0,))
    # With LoRA an online reference is the frozen base itself (ref_params None, one argument).
    ref_params = None
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(
            state, abstract_batch(pairs, seq, mesh), ref_params, frozen
        ).compile()
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return m, total, time.perf_counter() - t0, cfg


def memory_table(args) -> None:
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    runs = (
        ("full", 0, "precomputed"),
        ("lora", args.rank, "precomputed"),
        ("lora online", args.rank, "online"),
    )
    rows = []
    for seq in map(int, args.seqs.split(",")):
        for pairs in map(int, args.pairs.split(",")):
            for name, rank, ref in runs:
                m, total, secs, cfg = compile_memory(args.preset, rank, ref, seq, pairs, mesh)
                rows.append(
                    (
                        name,
                        seq,
                        pairs,
                        f"{(m.argument_size_in_bytes - m.alias_size_in_bytes) / GiB:.1f}",
                        f"{m.temp_size_in_bytes / GiB:.1f}",
                        f"{total / GiB:.1f}",
                        f"{secs:.0f}",
                    )
                )
                print(rows[-1], flush=True)
    print(
        f"machine: {machine()}; one device; {args.preset} ({cfg.n_params / 1e9:.2f} B params), "
        f"bf16 compute, remat full, AdamW; LoRA rank {args.rank} on {lora.LoraConfig.targets}"
    )
    print(
        table(
            (
                "run",
                "seq",
                "pairs",
                "args-donated GiB",
                "temp GiB",
                "total GiB/device",
                "compile s",
            ),
            rows,
        )
    )


def time_table(args) -> None:
    shp = Shapes()
    batch = {k: jnp.asarray(v) for k, v in concat_batch(shp, STEP_MODEL.vocab_size).items()}
    tx, sched = make_optimizer(OptimConfig(learning_rate=1e-6, schedule="constant"), 1000)
    step_cfg = ts.StepConfig(loss="apo_down", reference="precomputed")
    fns, live = {}, {}
    for name, rank in (("full", 0), (f"lora r{args.rank}", args.rank)):
        model = Llama(STEP_MODEL, rngs=nnx.Rngs(0))
        if rank:
            lora.attach(model, lora.LoraConfig(rank=rank), seed=0)
            graphdef, params, frozen = lora.split(model)
        else:
            (graphdef, params), frozen = ts.split_model(model), None
        state = jax.tree.map(jnp.copy, ts.init_state(params, tx, 0))
        step = jax.jit(
            functools.partial(
                ts.train_step, graphdef=graphdef, tx=tx, cfg=step_cfg, schedule=sched
            ),
            donate_argnums=(0,),
        )
        live[name] = state

        def run(name=name, step=step, frozen=frozen):
            live[name], m = step(live[name], batch, None, frozen)
            jax.block_until_ready(m["loss"])

        fns[name] = run
    times = time_interleaved(fns, args.repeats)
    n_tokens = 2 * shp.pairs * shp.seq
    rows = [(name, f"{median(t):.3f}", f"{n_tokens / median(t):.0f}") for name, t in times.items()]
    print(
        f"machine: {machine()}; model {dataclasses.asdict(STEP_MODEL)['n_layers']} layers "
        f"d_model {STEP_MODEL.d_model}, {shp.pairs} pairs x {shp.seq} tokens, float32, "
        f"median of {args.repeats}"
    )
    print(table(("run", "step s", "tokens/s"), rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--pairs", default="1")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--preset", default="llama3_8b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_time", action="store_true")
    ap.add_argument("--skip_memory", action="store_true")
    args = ap.parse_args()
    if not args.skip_memory:
        memory_table(args)
    if not args.skip_time:
        time_table(args)


if __name__ == "__main__":
    main()
