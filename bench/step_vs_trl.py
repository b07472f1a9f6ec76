"""Benchmark 1: apo_jax's train command against TRL's `DPOTrainer` on a real model, one run.

    python bench/step_vs_trl.py [--model /work/models/smollm2-hf] [--steps 6] [--warmup 2]
        [--rows apo-pre,apo-online,apo-lora-pre,apo-lora-online,trl-online,trl-pre,trl-lora,trl-bf16]
        [--long] [--long_steps 3]

The same preference pairs go to both sides: `--pairs` (32) short chat pairs from the embedded
demo's generator (a question, a short answer; rendered with the model's own chat template, whose
default system prompt is part of every prompt), and with `--long` a second set of pairs whose
prompts are about 500 tokens and answers about 300. Batch `--batch` (8) pairs, APO-zero, beta 0.1,
learning rate 1e-4 constant, AdamW, clipping 1.0, float32 unless the row says otherwise.

- apo_jax rows run `python -m apo_jax.train` itself (a subprocess; configs/apo_zero.py, shards made
  by `apo_jax.data.prepare`, default layout and model settings) with `log_every=1`; seconds per
  step come from each step's `train/tokens_per_sec` in metrics.jsonl. "pre": stored reference
  log-probs (made before the loop, not timed); "online": the reference forward inside the step.
- TRL rows run `trl.DPOTrainer(loss_type=["apo_zero"])` in a subprocess, `max_length` as the
  shards', a callback timing each optimizer step. "online": TRL's reference model; "pre":
  `precompute_ref_log_probs=True`; "lora": PEFT LoRA rank 8 (alpha 16) on q, k, v, o, gate, up,
  down, reference = adapters disabled; "bf16": the model loaded in bfloat16 (torch runs bfloat16
  matmuls through oneDNN, on AMX where the CPU has it).

Steady state: the median of the steps after `--warmup` that compiled nothing (apo_jax compiles
once per packed row count; `JAX_LOG_COMPILES` tells which steps did, marked "c"; its persistent
compile cache is off here, so "compile s" is the first step's compilation). Tokens/s
counts the same real tokens for every row (each pair's prompt twice and both answers, no padding).
Rows run one after another, so run the benchmark on a machine nobody else loads, or repeat it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = {
    # name: (side, reference, lora, dtype)
    "apo-pre": ("apo_jax", "precomputed", False, "float32"),
    "apo-online": ("apo_jax", "online", False, "float32"),
    "apo-lora-pre": ("apo_jax", "precomputed", True, "float32"),
    "apo-lora-online": ("apo_jax", "online", True, "float32"),
    "trl-online": ("trl", "online", False, "float32"),
    "trl-pre": ("trl", "precomputed", False, "float32"),
    "trl-lora": ("trl", "online", True, "float32"),
    "trl-lora-pre": ("trl", "precomputed", True, "float32"),
    "trl-bf16": ("trl", "online", False, "bfloat16"),
}
COMPILED = re.compile(r"Finished XLA compilation of .* in ([0-9.]+) s")
DEFAULT_ROWS = (
    "apo-pre,apo-online,apo-lora-pre,apo-lora-online,trl-online,trl-pre,trl-lora,trl-bf16"
)
# Which TRL row each apo_jax row is compared with (like with like: float32, same reference).
BASELINE = {
    "apo-pre": "trl-pre",
    "apo-online": "trl-online",
    "apo-lora-pre": "trl-lora",
    "apo-lora-online": "trl-lora",
}


def short_pairs(n: int, seed: int = 0) -> list[dict]:
    """n conversational pairs (TRL's format): one user turn, a short answer each side."""
    from apo_jax.data import demo

    rows = []
    for r in demo.generate_pairs(n, seed, multi_turn=0.0):
        rows.append(
            {"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
        )
    return rows


FILLER = (
    "The report lists the orders of the week, the stock left in each store and the notes of "
    "the staff about late deliveries, damaged boxes and the customers who called twice. "
)


def long_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs with prompts of about 500 tokens and answers of about 300 (CLAIR-like lengths)."""
    rows = short_pairs(n, seed)
    for i, r in enumerate(rows):
        q = r["prompt"][-1]["content"]
        r["prompt"][-1] = {"role": "user", "content": f"Document {i}. " + FILLER * 13 + q}
        for side in ("chosen", "rejected"):
            a = r[side][0]["content"]
            r[side] = [{"role": "assistant", "content": a + " " + FILLER * 7 + a}]
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def prepare(pairs_path: str, model: str, out: str, max_length: int) -> dict:
    from apo_jax.data import prepare as prep

    return prep.prepare(pairs_path, model, out, prep.Settings(max_length=max_length))


def pair_tokens(manifest: dict) -> float:
    """Mean real tokens per pair: prompt twice, both answers (from the shards' manifest)."""
    m = manifest["lengths"]
    return 2 * m["prompt"]["mean"] + m["chosen"]["mean"] + m["rejected"]["mean"]


# ------------------------------------------------------------------ apo_jax: the train command


def run_apo(spec: dict) -> dict:
    work = tempfile.mkdtemp(prefix="apo_bench_")
    args = [
        sys.executable,
        "-m",
        "apo_jax.train",
        "--config",
        os.path.join(ROOT, "configs/apo_zero.py"),
        "--workdir",
        work,
        f"--config.model.hf_path={spec['model']}",
        f"--config.data.train={spec['shards']}",
        "--config.data.seq_len=0",
        f"--config.batch_size={spec['batch']}",
        f"--config.num_steps={spec['steps']}",
        "--config.data.num_epochs=100",
        "--config.optim.learning_rate=1e-4",
        "--config.optim.warmup_steps=0",
        "--config.optim.schedule=constant",
        f"--config.reference.mode={spec['reference']}",
        f"--config.lora.rank={8 if spec['lora'] else 0}",
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.samples.num_prompts=0",
        "--config.plots=False",
        "--config.export_hf=False",
        "--config.checkpoint.every=0",
        "--config.checkpoint.keep_best=0",
        "--config.progress_bar=False",
    ]
    # One merged, unbuffered stream: JAX's compile log lines land before the step they delay.
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "PYTHONUNBUFFERED": "1",
        "JAX_LOG_COMPILES": "1",
        "APO_JAX_COMPILE_CACHE": "off",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"apo_jax train failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    steps = []
    with open(os.path.join(work, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "train/tokens_per_sec" in m:
                steps.append(m["train/tokens"] / m["train/tokens_per_sec"])
    compile_s, pending = [0.0] * len(steps), 0.0
    for line in proc.stdout.splitlines():
        hit = COMPILED.search(line)
        if hit and "train_fn" in line:
            pending += float(hit.group(1))
        step = re.match(r"\s*step (\d+)/", line)
        if step and int(step.group(1)) <= len(steps):
            compile_s[int(step.group(1)) - 1], pending = pending, 0.0
    layout = next((ln for ln in proc.stdout.splitlines() if "layout=auto chose" in ln), "")
    return {"step_s": steps, "compile_s": compile_s, "wall_s": wall, "note": layout[-160:]}


# ------------------------------------------------------------------ TRL's DPOTrainer


def run_trl(spec: dict) -> dict:
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(x) for x in open(spec["pairs"])]
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
        )
    out = tempfile.mkdtemp(prefix="trl_bench_")
    cfg = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        loss_type=["apo_zero"],
        beta=0.1,
        max_length=spec["max_length"],
        precompute_ref_log_probs=spec["reference"] == "precomputed",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        model_init_kwargs={"dtype": dtype},
        bf16=spec["dtype"] == "bfloat16",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tok = transformers.AutoTokenizer.from_pretrained(spec["model"])
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        spec["model"],
        args=cfg,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    return {
        "step_s": times,
        "wall_s": time.perf_counter() - t0,
        "note": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }


# ------------------------------------------------------------------ driver


def run_row(name: str, spec: dict) -> dict:
    """Runs one row in a fresh process (each side starts as a user's command would)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", f.name],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady(r: dict, warmup: int) -> float:
    """Median seconds of the steps after `warmup` that compiled nothing (apo_jax compiles each new
    packed row count once; its log says which steps did)."""
    comp = r.get("compile_s") or [0.0] * len(r["step_s"])
    after = list(zip(r["step_s"], comp, strict=True))[warmup:]
    clean = [t for t, c in after if not c] or [t - c for t, c in after] or r["step_s"][-1:]
    return statistics.median(clean)


def shape_rows(
    label: str, manifest: dict, shards: str, pairs_path: str, max_length: int, steps: int, args
) -> list:
    tokens_per_step = pair_tokens(manifest) * args.batch
    results = {}
    for name in args.rows.split(","):
        side, ref, lora, dtype = ROWS[name]
        spec = dict(
            side=side,
            reference=ref,
            lora=lora,
            dtype=dtype,
            model=args.model,
            shards=shards,
            pairs=pairs_path,
            batch=args.batch,
            steps=steps,
            max_length=max_length,
        )
        results[name] = run_row(name, spec)
        print(f"# {label} {name}: {json.dumps(results[name])}", flush=True)
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append((label, name, "error", r["error"][:80], "", "", "", ""))
            continue
        s = steady(r, args.warmup)
        base = results.get(BASELINE.get(name, ""), {})
        ratio = f"{steady(base, args.warmup) / s:.2f}x" if "step_s" in base else ""
        comp = r.get("compile_s") or [0.0] * len(r["step_s"])
        every = " ".join(
            f"{x:.1f}" + ("c" if c else "") for x, c in zip(r["step_s"], comp, strict=True)
        )
        first = f"{comp[0]:.1f}" if r.get("compile_s") else ""
        rows.append(
            (
                label,
                name,
                f"{s:.2f}",
                every,
                f"{tokens_per_step / s:.0f}",
                ratio,
                first,
                f"{r['wall_s']:.0f}",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="/work/models/smollm2-hf", help="HF model directory")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of {sorted(ROWS)}")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--long", action="store_true", help="also the ~500 + ~300 token pairs")
    ap.add_argument("--long_steps", type=int, default=3)
    ap.add_argument("--skip_short", action="store_true")
    args = ap.parse_args()
    if args.worker:
        spec = json.load(open(args.worker))
        res = run_apo(spec) if spec["side"] == "apo_jax" else run_trl(spec)
        print(json.dumps(res))
        return
    from common import table

    tmp = tempfile.mkdtemp(prefix="step_vs_trl_")
    load0 = os.getloadavg()
    rows = []
    shapes = [] if args.skip_short else [("short", short_pairs(args.pairs), 128, args.steps)]
    if args.long:
        shapes.append(("long", long_pairs(args.pairs), 1024, args.long_steps))
    for label, pairs, max_length, steps in shapes:
        path = os.path.join(tmp, f"{label}.jsonl")
        write_jsonl(pairs, path)
        shards = os.path.join(tmp, f"{label}_shards")
        manifest = prepare(path, args.model, shards, max_length)
        print(f"# {label}: {manifest.get('lengths', {})}", flush=True)
        rows += shape_rows(label, manifest, shards, path, max_length, steps, args)
    import platform

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model {args.model}, {args.pairs} pairs, batch {args.batch}, steps {args.steps} "
        f"(median of the steps after the first {args.warmup})"
    )
    header = (
        "pairs",
        "row",
        "s/step (median)",
        "every step (c: compiled)",
        "tokens/s",
        "vs TRL",
        "compile s",
        "wall s",
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
