"""Benchmark 6 (driver: bench/gpu.sh): GPU correctness, llama3_1b step throughput and MFU.

    python bench/gpu_check.py [--dry] [--budget-s 300] [--out DIR]

1. parity: a small float32 Llama's GPU logits against the CPU logits of the same weights
   (max |diff|, tolerance 2e-3, matmul precision 'highest').
2. attention: cuDNN's fused attention against XLA's on the GPU, bfloat16, same weights: logits
   and parameter gradients (relative L2 error, tolerance 2e-2) for plain causal rows, packed rows
   (segment ids -> a mask) and the prefix layout's branch mask.
3. step: the `llama3_1b` preset's APO-down train step (precomputed reference, bfloat16 compute,
   float32 master weights, AdamW), sequence 2048, half prompt, for each variant (attention
   implementation x remat policy) the largest pairs-per-step whose compiled memory fits the
   card, timed (median of 5 after 2 warm-ups). Tokens/s counts every token of the 2N rows; MFU =
   model FLOPs (3 x forward, causal attention counted as half the square, the unembedding only at
   the completion tokens, which is all the head computes since 2026-11-27, no recomputation) over
   the bf16 dense peak (H100/H200 SXM: 989 TFLOP/s) and over a `jnp.dot` 8192^3 measured in-run.
4. generation: greedy tokens/s of the same preset (bfloat16 weights, random), 32 prompts of 128
   tokens, 128 new tokens each, through `models.generate.generate` (the eval's path).
5. `--llama8b` (a separate process, so that the device's peak memory is this step's alone): a
   `llama3_8b` LoRA train step on one device, as a LoRA run does it: rank-16 adapters on
   q,k,v,o,gate,up,down in float32 with AdamW, the base frozen in bfloat16, the online reference =
   the base without adapters (the same arrays). Random weights are drawn on the device by a jitted
   initializer (no checkpoint). 1 pair of 4096 tokens (2048 if the compiled memory analysis says
   4096 does not fit the device), 3 timed steps after 1 warm-up; records the memory analysis, the
   device's peak bytes in use and tokens/s, within `--llama8b-budget-s` (skipped with a line when
   it is spent).
Variants run in order until `--budget-s` is spent; each result is also written, as one JSON line,
to OUT/gpu_results.jsonl (OUT: `--out`, else $OUT, else bench/out).
`--dry`: tiny shapes on CPU (XLA attention only), to check the script where no GPU is lent.
Imports only jax, flax, optax, numpy and apo_jax's model/step modules (no grain, array-record,
ml-collections or datasets).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import Shapes, concat_batch, forward_flops, median, table, time_interleaved, ts
from flax import nnx

from apo_jax.layouts.prefix import attention_mask as prefix_attention_mask
from apo_jax.models import lora
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.optim import OptimConfig, make_optimizer

PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16
T0 = time.perf_counter()


class Recorder:
    """Prints each result and appends it to OUT/gpu_results.jsonl."""

    def __init__(self, out_dir: str, append: bool = False):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "gpu_results.jsonl")
        if not append:
            open(self.path, "w").close()

    def __call__(self, kind: str, **rec):
        rec = {"kind": kind, "t_s": round(time.perf_counter() - T0, 1), **rec}
        print(json.dumps(rec), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def small_cfg(**kw):
    return get_preset(
        "tiny",
        vocab_size=1024,
        d_model=256,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        head_dim=64,
        mlp_dim=512,
        max_seq_len=1024,
        **kw,
    )


def parity() -> dict:
    """GPU float32 logits against CPU logits of the same weights."""
    model = Llama(small_cfg(attention="xla"), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (2, 128)), jnp.int32)
    cpu = jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
        g, s = nnx.split(model)
        s_cpu, ids_cpu = jax.device_put((s, ids), cpu)
        ref = np.asarray(jax.jit(lambda s, x: nnx.merge(g, s)(x))(s_cpu, ids_cpu))
    diff = float(np.max(np.abs(out - ref)))
    return {"max_abs_diff": diff, "tol": 2e-3, "ok": bool(np.isfinite(diff) and diff < 2e-3)}


def _rel(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def attention_cases(rng, b: int, t: int) -> dict:
    """Inputs for the three mask kinds: causal, packed segments, prefix branches."""
    ids = jnp.asarray(rng.integers(0, 1024, (b, t)), jnp.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):  # two segments and right padding per row
        a, c = int(rng.integers(t // 4, t // 2)), int(rng.integers(t // 2 + 8, t - 8))
        seg[r, :a], seg[r, a:c] = 1, 2
        pos[r, :a], pos[r, a:c] = np.arange(a), np.arange(c - a)
    branch = np.zeros((b, t), np.int32)
    p = t // 2
    branch[:, p : p + t // 4], branch[:, p + t // 4 :] = 1, 2
    ppos = np.concatenate([np.arange(p + t // 4), np.arange(p, p + t - p - t // 4)])
    return {
        "causal": dict(input_ids_BxT=ids),
        "packed": dict(
            input_ids_BxT=ids, positions_BxT=jnp.asarray(pos), segment_ids_BxT=jnp.asarray(seg)
        ),
        "prefix": dict(
            input_ids_BxT=ids,
            positions_BxT=jnp.asarray(np.tile(ppos, (b, 1))),
            attn_mask_BxTxT=prefix_attention_mask(jnp.asarray(branch), jnp.ones((b, t), jnp.int32)),
        ),
    }


def attention_check(dry: bool) -> list[dict]:
    """cuDNN against XLA attention, bf16, logits and gradients, for each mask kind."""
    if dry:
        return [{"case": "all", "skipped": "no cuDNN on CPU"}]
    cfg = small_cfg(dtype="bfloat16")
    model = Llama(cfg.replace(attention="xla"), rngs=nnx.Rngs(1))
    _, params = nnx.split(model)
    graphs = {
        a: nnx.split(Llama(cfg.replace(attention=a), rngs=nnx.Rngs(1)))[0] for a in ("xla", "cudnn")
    }
    out = []
    w = jnp.asarray(np.random.default_rng(2).normal(size=(cfg.vocab_size,)), jnp.float32)
    for case, kw in attention_cases(np.random.default_rng(3), 4, 256).items():
        res = {}
        try:
            for impl, g in graphs.items():

                def loss(p, g=g, kw=kw):
                    logits = nnx.merge(g, p)(**kw)
                    return jnp.mean(jax.nn.log_softmax(logits) @ w), logits

                (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
                res[impl] = (logits, grads)
        except Exception as e:  # noqa: BLE001 - an unsupported mask kind is a finding
            out.append({"case": case, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        rec = {
            "case": case,
            "logits_rel": _rel(res["cudnn"][0], res["xla"][0]),
            "grads_rel": _rel(res["cudnn"][1], res["xla"][1]),
            "tol": 2e-2,
        }
        rec["ok"] = bool(rec["logits_rel"] < 2e-2 and rec["grads_rel"] < 2e-2)
        out.append(rec)
    return out


def dot_ceiling(n: int, dtype) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    t = time_interleaved({"dot": lambda: f(a, b).block_until_ready()}, 10)["dot"]
    return 2 * n**3 / median(t)


class StepBench:
    """One llama3_1b train state on the device, stepped by compiled variants of the step."""

    def __init__(self, cfg, chunk: int):
        self.cfg = cfg
        tx, self.sched = make_optimizer(OptimConfig(learning_rate=1e-6, schedule="constant"), 1000)
        self.tx = tx
        graphdef, params = ts.split_model(Llama(cfg, rngs=nnx.Rngs(0)))
        self.state = jax.tree.map(jnp.copy, ts.init_state(params, tx, 0))
        del params
        self.step_cfg = ts.StepConfig(loss="apo_down", reference="precomputed", logprob_chunk=chunk)
        stats = jax.devices()[0].memory_stats() or {}
        self.limit = stats.get("bytes_limit", 0)

    def jitted(self, variant: dict):
        """(model config, jitted step) for a variant: LlamaConfig fields plus an optional chunk."""
        model_fields = {k: v for k, v in variant.items() if k != "chunk"}
        cfg = self.cfg.replace(**model_fields)
        step_cfg = self.step_cfg
        if "chunk" in variant:
            step_cfg = dataclasses.replace(step_cfg, logprob_chunk=variant["chunk"])
        graphdef, _ = ts.split_model(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
        fn = functools.partial(
            ts.train_step, graphdef=graphdef, tx=self.tx, cfg=step_cfg, schedule=self.sched
        )
        return cfg, jax.jit(fn, donate_argnums=(0,))

    def compile(self, variant: dict, pairs: int, seq: int):
        """(compiled step, device batch) for `pairs` pairs of `seq` tokens."""
        cfg, jitted = self.jitted(variant)
        shp = Shapes(pairs=pairs, seq=seq, prompt=seq // 2)
        batch = {k: jnp.asarray(v) for k, v in concat_batch(shp, cfg.vocab_size).items()}
        return jitted.lower(self.state, batch, None).compile(), batch

    def run(self, variant: dict, pairs_list, seq: int, repeats: int) -> dict:
        cfg, jitted = self.jitted(variant)
        tried = []
        for pairs in pairs_list:
            shp = Shapes(pairs=pairs, seq=seq, prompt=seq // 2)
            batch = {k: jnp.asarray(v) for k, v in concat_batch(shp, cfg.vocab_size).items()}
            t0 = time.perf_counter()
            try:
                compiled = jitted.lower(self.state, batch, None).compile()
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at compile: fewer pairs
                tried.append(f"{pairs}: compile {type(e).__name__}: {str(e)[:120]}")
                continue
            compile_s = time.perf_counter() - t0
            m = compiled.memory_analysis()
            need = (
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                - m.alias_size_in_bytes
                + m.temp_size_in_bytes
            )
            if self.limit and need > 0.97 * self.limit:
                tried.append(f"{pairs}: needs {need / 2**30:.1f} GiB > {self.limit / 2**30:.1f}")
                del compiled
                continue
            holder = [self.state]

            def one(c=compiled, b=batch, h=holder):
                h[0], met = c(h[0], b, None)
                met["loss"].block_until_ready()

            try:
                times = time_interleaved({"s": one}, repeats, warmup=2)["s"]
            except Exception as e:  # noqa: BLE001 - out of memory at run time: fewer pairs
                tried.append(f"{pairs}: run {type(e).__name__}: {str(e)[:120]}")
                self.state = holder[0]
                continue
            self.state = holder[0]
            secs = median(times)
            flops = 3 * forward_flops(cfg, shp, causal=True, head_tokens=shp.seq - shp.prompt)
            return {
                **variant,
                "seq": seq,
                "pairs": pairs,
                "ms_step": round(1e3 * secs, 1),
                "all_ms": [round(1e3 * x, 1) for x in times],
                "tokens_s": round(2 * pairs * seq / secs),
                "tflops": round(flops / secs / 1e12, 1),
                "mfu_peak": round(flops / secs / PEAK_BF16, 3),
                "gib_needed": round(need / 2**30, 1),
                "compile_s": round(compile_s, 1),
                "tried": tried,
            }
        return {**variant, "seq": seq, "failed": tried}


def generation(cfg, batch: int, prompt_len: int, new: int) -> dict:
    """Greedy generation tokens/s of `cfg` (random weights): `batch` prompts, `new` tokens each,
    the eval's path (`models.generate.generate`: a jitted prefill and a `lax.while_loop` over a
    KV cache); the first call compiles, the second is timed."""
    from apo_jax.models.generate import generate

    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    generate(model, prompts, max_new_tokens=new)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new)
    secs = time.perf_counter() - t0
    tokens = sum(len(o) for o in out)
    return {
        "batch": batch,
        "prompt": prompt_len,
        "new": new,
        "tokens": tokens,
        "tokens_s": round(tokens / secs),
        "s": round(secs, 2),
        "first_call_s": round(compile_s, 1),
    }


def lora_on_device(cfg, rank: int, device):
    """(adapter graphdef, base graphdef, adapters, frozen base) of a randomly initialised Llama
    with LoRA adapters, drawn by one jitted initializer straight onto `device`: the base in
    `cfg.param_dtype`, the adapters in float32; no host copy of the weights is made."""

    def build():
        model = Llama(cfg, rngs=nnx.Rngs(0))
        lora.attach(model, lora.LoraConfig(rank=rank), seed=0)
        return model

    graphdef = lora.split(nnx.eval_shape(build))[0]
    base_graphdef = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0]
    on_device = jax.sharding.SingleDeviceSharding(device)
    adapters, frozen = jax.jit(lambda: lora.split(build())[1:], out_shardings=on_device)()
    return graphdef, base_graphdef, adapters, frozen


def lora_step(
    cfg,
    *,
    rank: int = 16,
    seqs=(4096, 2048),
    chunk: int = 512,
    repeats: int = 3,
    warmup: int = 1,
    budget_s: float = 150.0,
    limit: int | None = None,
) -> dict:
    """A LoRA APO-down train step of `cfg` on one device: online reference (the frozen base
    without adapters), 1 pair of the first sequence length in `seqs` whose compiled memory fits
    `limit` bytes (default: the device's `bytes_limit`; unknown, as on CPU: no check); `repeats`
    timed steps after `warmup`. Stops (with a `skipped` reason) once `budget_s` is spent."""
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    if limit is None:
        limit = (dev.memory_stats() or {}).get("bytes_limit", 0)
    tx, sched = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant"), 1000)
    graphdef, base_graphdef, adapters, frozen = lora_on_device(cfg, rank, dev)
    state = jax.tree.map(jnp.copy, ts.init_state(adapters, tx, 0))
    del adapters
    jax.block_until_ready((state, frozen))
    rec = {
        "preset_params_b": round(cfg.n_params / 1e9, 2),
        "rank": rank,
        "remat": cfg.remat,
        "attention": cfg.attention,
        "param_dtype": cfg.param_dtype,
        "adapter_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "init_s": round(time.perf_counter() - t_start, 1),
        "limit_gib": round(limit / 2**30, 1) if limit else None,
        "tried": [],
    }
    step_cfg = ts.StepConfig(loss="apo_down", reference="online", logprob_chunk=chunk)
    fn = functools.partial(
        ts.train_step,
        graphdef=graphdef,
        tx=tx,
        cfg=step_cfg,
        schedule=sched,
        ref_graphdef=base_graphdef,
    )
    jitted = jax.jit(fn, donate_argnums=(0,))
    for seq in seqs:
        if time.perf_counter() - t_start > budget_s:
            return {**rec, "skipped": f"budget of {budget_s:.0f} s spent before seq {seq}"}
        shp = Shapes(pairs=1, seq=seq, prompt=seq // 2)
        batch = {k: jnp.asarray(v) for k, v in concat_batch(shp, cfg.vocab_size).items()}
        t0 = time.perf_counter()
        try:
            compiled = jitted.lower(state, batch, None, frozen).compile()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at compile: shorter rows
            rec["tried"].append(f"{seq}: compile {type(e).__name__}: {str(e)[:120]}")
            continue
        m = compiled.memory_analysis()
        need = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
        analysis = {
            "argument_gib": m.argument_size_in_bytes / 2**30,
            "output_gib": m.output_size_in_bytes / 2**30,
            "alias_gib": m.alias_size_in_bytes / 2**30,
            "temp_gib": m.temp_size_in_bytes / 2**30,
            "total_gib": need / 2**30,
        }
        analysis = {k: round(v, 2) for k, v in analysis.items()}
        analysis["total_bytes"] = int(need)
        rec["tried"].append(
            {"seq": seq, "compile_s": round(time.perf_counter() - t0, 1), **analysis}
        )
        print(f"llama8b part: seq {seq} compiled, {rec['tried'][-1]}", flush=True)
        if limit and need > 0.97 * limit:
            rec["tried"][-1]["fits"] = False
            del compiled
            continue
        spent = time.perf_counter() - t_start
        if spent > budget_s:
            return {
                **rec,
                "skipped": f"budget: {spent:.0f} s of {budget_s:.0f} s spent by the compile",
            }
        holder, losses = [state], []

        def one(c=compiled, b=batch, h=holder, out=losses):
            h[0], met = c(h[0], b, None, frozen)
            out.append(float(met["loss"]))

        try:
            times = time_interleaved({"s": one}, repeats, warmup=warmup)["s"]
        except Exception as e:  # noqa: BLE001 - out of memory at run time: shorter rows
            rec["tried"][-1]["run_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            state = holder[0]
            continue
        state = holder[0]
        secs = median(times)
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
        return {
            **rec,
            "seq": seq,
            "pairs": 1,
            "ms_step": round(1e3 * secs, 1),
            "all_ms": [round(1e3 * x, 1) for x in times],
            "tokens_s": round(2 * seq / secs),
            "losses": losses,
            "steps": int(state.step),
            "memory_analysis": analysis,
            "peak_gib": round(peak / 2**30, 2) if peak else None,
            "ok": all(np.isfinite(losses)),
            "part_s": round(time.perf_counter() - t_start, 1),
        }
    return {**rec, "failed": "no sequence length fits"}


def llama8b_part(args, rec) -> None:
    """5 above: the one-device LoRA step, `llama3_8b` (the tiny preset with `--dry`)."""
    if args.dry:
        cfg = get_preset(
            "tiny", dtype="bfloat16", param_dtype="bfloat16", remat="full", attention="xla"
        )
        kw = dict(seqs=(64, 32), chunk=32)
    else:
        cfg = get_preset(
            "llama3_8b",
            dtype="bfloat16",
            param_dtype="bfloat16",
            remat="full",
            attention="cudnn",
            scan_layers=True,
        )
        kw = dict(seqs=(4096, 2048), chunk=512)
    try:
        r = lora_step(cfg, rank=16, budget_s=args.llama8b_budget_s, **kw)
    except Exception as e:  # noqa: BLE001 - record the failure (out of memory at init, ...)
        r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    rec("llama8b_lora_step", preset="tiny" if args.dry else "llama3_8b", **r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true")
    ap.add_argument(
        "--budget-s", type=float, default=300.0, help="stop starting new variants after"
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench", "out"))
    ap.add_argument(
        "--variants",
        default="",
        help="'attention:remat:pairs,pairs[:chunk];...' instead of the default list",
    )
    ap.add_argument("--skip-checks", action="store_true", help="timings only (no parity checks)")
    ap.add_argument(
        "--llama8b",
        action="store_true",
        help="only the one-device llama3_8b LoRA step (appends its records)",
    )
    ap.add_argument(
        "--llama8b-budget-s",
        type=float,
        default=150.0,
        help="the llama3_8b step's time budget, its initialisation and compiles included",
    )
    args = ap.parse_args()
    rec = Recorder(args.out, append=args.llama8b)
    dev = jax.devices()[0]
    auto = Llama(small_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0)).layers.self_attn
    rec(
        "device",
        device=dev.device_kind,
        platform=dev.platform,
        jax=jax.__version__,
        flax=__import__("flax").__version__,
        optax=__import__("optax").__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        auto_attention=auto.implementation(jnp.bfloat16, cached=False) or "xla",
    )
    if not args.dry and dev.platform != "gpu":
        sys.exit("no GPU: run with --dry")
    if args.llama8b:
        llama8b_part(args, rec)
        return

    checks = (
        ()
        if args.skip_checks
        else (
            ("parity", lambda: [parity()]),
            ("attention", lambda: attention_check(args.dry)),
        )
    )
    for kind, fn in checks:
        try:
            for r in fn():
                rec(kind, **r)
        except Exception as e:  # noqa: BLE001 - record the failure, go on to the timings
            rec(kind, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")

    if args.dry:
        cfg, seq, repeats, chunk = get_preset("tiny", dtype="bfloat16"), 64, 2, 32
        variants = [
            (dict(attention="xla", remat="save_dots"), (4, 2)),
            (dict(attention="xla", remat="full"), (4, 2)),
        ]
        ceiling = dot_ceiling(512, jnp.float32)
    else:
        cfg, seq, repeats, chunk = get_preset("llama3_1b"), 2048, 5, 512
        variants = [
            (dict(attention="cudnn", remat="save_dots"), (16, 8, 4)),
            (dict(attention="cudnn", remat="full"), (16, 8)),
            (dict(attention="xla", remat="full"), (8, 4)),
        ]
        ceiling = dot_ceiling(8192, jnp.bfloat16)
    if args.variants:
        variants = []
        for v in args.variants.split(";"):
            attn, remat, pairs, *rest = v.split(":")
            extra = {"chunk": int(rest[0])} if rest else {}
            variants.append(
                (dict(attention=attn, remat=remat, **extra), tuple(map(int, pairs.split(","))))
            )
    rec("dot_ceiling", tflops=round(ceiling / 1e12, 1), dtype="bf16" if not args.dry else "f32")
    bench = StepBench(cfg, chunk)
    rows, last = [], 0.0
    for variant, pairs in variants:
        elapsed = time.perf_counter() - T0
        if elapsed + last > args.budget_s:
            rec(
                "step",
                **variant,
                skipped=f"budget: {elapsed:.0f} s spent, last variant {last:.0f} s",
            )
            continue
        t0 = time.perf_counter()
        r = bench.run(variant, pairs, seq, repeats)
        last = time.perf_counter() - t0
        r["mfu_dot"] = round(r["tflops"] * 1e12 / ceiling, 3) if "tflops" in r else None
        rec("step", **r)
        if "tflops" in r:
            rows.append(
                (
                    r["attention"],
                    r["remat"],
                    r.get("chunk", chunk),
                    seq,
                    r["pairs"],
                    r["ms_step"],
                    r["tokens_s"],
                    r["tflops"],
                    f"{100 * r['mfu_peak']:.1f}%",
                    f"{100 * r['mfu_dot']:.1f}%",
                    r["gib_needed"],
                    r["compile_s"],
                )
            )
        gc.collect()
    del bench
    gc.collect()
    gen_cfg = (
        get_preset("tiny", dtype="bfloat16")
        if args.dry
        else cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    )
    try:
        rec(
            "generation",
            **generation(gen_cfg, 32, 128 if not args.dry else 16, 128 if not args.dry else 8),
        )
    except Exception as e:  # noqa: BLE001 - record the failure, still print the step table
        rec("generation", ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    print(
        f"device {dev.device_kind}; {cfg.n_params / 1e9:.2f} B params; bf16 dot ceiling "
        f"{ceiling / 1e12:.0f} TFLOP/s; {time.perf_counter() - T0:.0f} s in all"
    )
    print(
        table(
            (
                "attention",
                "remat",
                "chunk",
                "seq",
                "pairs",
                "ms/step",
                "tokens/s",
                "TFLOP/s",
                "MFU vs 989",
                "vs dot",
                "GiB",
                "compile s",
            ),
            rows,
        )
    )


if __name__ == "__main__":
    main()
