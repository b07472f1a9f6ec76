"""Where a train step's device time goes: a `jax.profiler` trace of the step, summed by kernel.

    python bench/gpu_profile.py [--dry] [--pairs 8] [--remat save_dots] [--steps 2] [--top 25]

Builds the `llama3_1b` APO-down step as benchmark 6 does (cuDNN attention, sequence 2048), runs
2 warm-up steps, traces `--steps` steps, then reads the trace (`jax.profiler.ProfileData`) and
prints the device time per step by kernel name and by kind (matmul, attention, fusion, copy,
other), largest first. The `.xplane.pb` is left under OUT/trace for TensorBoard or XProf.
`--dry`: the tiny preset on CPU, to check the script end to end (host-side XLA ops stand in for
kernels there).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import time

import jax
import jax.numpy as jnp
from common import Shapes, forward_flops, table
from gpu_check import StepBench

from apo_jax.models.config import get_preset

KINDS = (
    ("attention", re.compile(r"cudnn|flash|fmha|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|cublas|matmul|dot|wgmma|sm90_xmma|cutlass", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic[-_]update|slice", re.I)),
    ("fusion (element-wise, reductions)", re.compile(r"fusion|reduce|loop_|input_", re.I)),
)


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def device_events(trace_dir: str):
    """(plane name, event name, duration ns) of every kernel/op event in the newest trace."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise SystemExit(f"no .xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    planes = gpu or [p for p in data.planes if p.name.startswith("/host:CPU")]
    for plane in planes:
        lines = list(plane.lines)
        print(f"trace plane {plane.name}: lines {[ln.name for ln in lines][:12]}")
        if gpu:  # one line per CUDA stream (the kernels) besides summary lines such as "XLA Ops"
            picked = [ln for ln in lines if ln.name.startswith("Stream")]
            picked = picked or [ln for ln in lines if "XLA Ops" in ln.name]
        else:  # XLA:CPU runs its thunks on its own threads, not on the Python thread
            picked = [ln for ln in lines if not ln.name.startswith("python")]
        for line in picked:
            for ev in line.events:
                yield plane.name, ev.name, ev.duration_ns


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--remat", default="save_dots")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench", "out"))
    args = ap.parse_args()
    if args.dry:
        cfg, seq, chunk = get_preset("tiny", dtype="bfloat16"), 64, 32
        variant = dict(attention="xla", remat=args.remat)
    else:
        cfg, seq, chunk = get_preset("llama3_1b"), 2048, 512
        variant = dict(attention=args.attention, remat=args.remat)
    bench = StepBench(cfg, chunk)
    model_cfg = cfg.replace(**variant)
    compiled, batch = bench.compile(variant, args.pairs, seq)
    state = bench.state
    for _ in range(2):
        state, m = compiled(state, batch, None)
    m["loss"].block_until_ready()
    trace_dir = os.path.join(args.out, "trace")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, m = compiled(state, batch, None)
        m["loss"].block_until_ready()
    wall = (time.perf_counter() - t0) / args.steps
    by_name: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    for _, name, ns in device_events(trace_dir):
        by_name[name] += ns / 1e6 / args.steps
        count[name] += 1
    total = sum(by_name.values())
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, ms in by_name.items():
        by_kind[kind_of(name)] += ms
    flops = 3 * forward_flops(
        model_cfg, Shapes(args.pairs, seq, seq // 2), causal=True, head_tokens=seq - seq // 2
    )
    print(
        f"device {jax.devices()[0].device_kind}; {variant}, pairs {args.pairs}, seq {seq}; "
        f"wall {wall * 1e3:.1f} ms/step (traced), kernels {total:.1f} ms/step, "
        f"model {flops / 1e12:.1f} TFLOP/step"
    )
    print(
        table(
            ("kind", "ms/step", "share"),
            [
                (k, f"{v:.1f}", f"{100 * v / max(total, 1e-9):.1f}%")
                for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
            ],
        )
    )
    rows = [
        (
            n[:90],
            count[n] // args.steps,
            f"{ms:.2f}",
            f"{100 * ms / max(total, 1e-9):.1f}%",
            kind_of(n),
        )
        for n, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[: args.top]
    ]
    print(table(("kernel", "calls/step", "ms/step", "share", "kind"), rows))
    del state


if __name__ == "__main__":
    jnp.zeros(())  # initialize the backend before the profiler starts
    main()
