"""What ``python -m apo_jax.eval`` does: prompts in, generations, scores and exports out.

Files under ``--out``:

- ``progress.jsonl`` and ``run.json``: the resume log and what it depends on
  (:mod:`apo_jax.eval.progress`).
- ``generations.jsonl``: one line per prompt row (and sample), in input order, written whole at
  the end: ``id, prompt, response, finish_reason, num_tokens`` (+ ``sample``, ``correct``).
- ``rejects.jsonl``: rows that cannot be evaluated, with a stable reason.
- ``summary.json``: fingerprints, settings, counts, tokens/s, checker accuracy, judge win rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from apo_jax.data import tokenize
from apo_jax.errors import UserError
from apo_jax.eval import exports, generation, progress, scoring
from apo_jax.eval import prompts as prompts_lib
from apo_jax.eval.generation import Key, Sampling


class EvalError(UserError):
    """A model path, tokenizer, output directory or setting the command cannot use."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one evaluation run needs (the command's flags)."""

    model: str  # HF checkpoint dir, or a training workdir with an hf/ export
    prompts: str  # .jsonl / .json / .parquet / datasets dir
    out: str  # output directory
    tokenizer: str = ""  # default: the model dir's tokenizer files
    sampling: Sampling = Sampling()
    batch_size: int = 16
    prompt_field: str = "prompt"
    split: str = "train"
    dtype: str = "float32"
    mesh: tuple[int, int, int] = (-1, 1, 1)  # data, fsdp, tensor
    checker: str = ""  # module:function
    formats: tuple[str, ...] = ()
    model_name: str = ""  # name in exports; default from the model path
    mixeval_benchmark: str = "mixeval_hard"
    mixeval_version: str = "2024-06-01"
    judge: Any = None  # judge.JudgeSettings, or None


def resolve_model_dir(path: str) -> str:
    """The Hugging Face directory of `--model`: the path itself (a checkpoint, or a PEFT LoRA
    adapter whose base is a local checkpoint), or a training workdir's hf/."""
    from apo_jax.models import lora
    from apo_jax.models.convert import resolve_model_path

    path = resolve_model_path(path)  # a .gguf file: its converted directory
    if not os.path.isdir(path):
        raise EvalError(f"--model={path}: no such directory")
    hf_dir = os.path.join(path, "hf")
    # A training workdir also holds a config.json (the run's, apo_jax.train.workdir): look for its
    # export first.
    workdir = os.path.isdir(os.path.join(path, "checkpoints"))
    if workdir and os.path.exists(os.path.join(hf_dir, "config.json")):
        return hf_dir
    if not workdir and os.path.exists(os.path.join(path, "config.json")):
        return path
    if lora.is_adapter_dir(path):
        base = lora.config_dir(path)
        if not base or not os.path.exists(os.path.join(base, "config.json")):
            where = base or "none recorded"
            raise EvalError(
                f"--model={path} is a LoRA adapter whose base model ({where}) is not a local "
                "checkpoint directory"
            )
        return path
    if os.path.exists(os.path.join(hf_dir, "config.json")):
        return hf_dir
    if workdir:
        raise EvalError(
            f"--model={path} is a training workdir without its Hugging Face export ({hf_dir}); "
            "training writes it when it finishes (config.export_hf=True): rerun the train command "
            "to finish the run, or pass an exported directory"
        )
    raise EvalError(
        f"--model={path}: not a Hugging Face checkpoint (no config.json) nor a training workdir "
        "with an hf/ export"
    )


def default_model_name(model_arg: str, model_dir: str) -> str:
    """A name for exports: the workdir's name for `<workdir>/hf`, else the directory's name."""
    base = os.path.abspath(model_arg if model_dir != model_arg else model_dir)
    return os.path.basename(base.rstrip(os.sep)) or "model"


def _max_positions(model_dir: str) -> int:
    from apo_jax.models import lora

    with open(os.path.join(lora.config_dir(model_dir), "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    return int(cfg.get("max_position_embeddings") or 1 << 30)


def weights_fingerprint(model_dir: str) -> str:
    """Identifies the weights without reading them all: config.json and each safetensors file's
    name, size and first MiB (the safetensors header, which holds every tensor's offsets); for a
    LoRA adapter its config, its weights and its base's fingerprint."""
    from apo_jax.models import lora

    h = hashlib.sha256()
    base = lora.config_dir(model_dir)
    if base != model_dir:
        h.update(weights_fingerprint(base).encode())
    for name in sorted(os.listdir(model_dir)):
        if name in ("config.json", lora.ADAPTER_CONFIG) or name.endswith(".safetensors"):
            path = os.path.join(model_dir, name)
            h.update(f"{name}:{os.path.getsize(path)}".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def _load_tokenizer(tok_dir: str) -> Any:
    try:
        return tokenize.load_tokenizer(tok_dir)
    except tokenize.TokenizerError as e:
        raise EvalError(f"--tokenizer: {e}") from None


def _prepare(s: Settings, model_dir: str, tokenizer: Any):
    """Reads, renders and rejects prompts; writes rejects.jsonl."""
    examples, rejects = prompts_lib.read(s.prompts, prompt_field=s.prompt_field, split=s.split)
    ids, bad = generation.encode_examples(tokenizer, examples, _max_positions(model_dir))
    for ex in examples:
        if ex.index in bad:
            reason, detail = bad[ex.index]
            rejects.append(
                {
                    "index": ex.index,
                    "file": s.prompts,
                    "line": None,
                    "id": ex.id,
                    "field": "prompt",
                    "reason": reason,
                    "detail": detail[:200],
                }
            )
    examples = [ex for ex in examples if ex.index in ids]
    rejects.sort(key=lambda r: r["index"])
    _write_jsonl(os.path.join(s.out, "rejects.jsonl"), rejects)
    return examples, ids, rejects


def _prompts_fingerprint(examples: list, prompt_ids: dict[int, list[int]]) -> str:
    """A sha256 of every evaluated row's id and rendered prompt tokens (the prompts file, its
    split and field, and the chat template together)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.index, str(ex.id), prompt_ids[ex.index]]).encode())
    return h.hexdigest()


def _generate(
    s: Settings,
    model_dir: str,
    tokenizer: Any,
    prompt_ids: dict[int, list[int]],
    row_ids: dict[int, Any],
    done: dict[Key, dict[str, Any]],
    log: progress.ProgressLog,
    on_batch: Callable[[int], None] | None,
) -> generation.Generator:
    """Loads the model onto the mesh and generates every missing response into `done` and `log`."""
    from apo_jax import sharding
    from apo_jax.models import hf, lora

    try:
        mesh = sharding.make_mesh(*s.mesh)
    except sharding.MeshError as e:
        raise EvalError(f"--mesh_data/--mesh_fsdp/--mesh_tensor: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if s.batch_size % shards:
        raise EvalError(
            f"--batch_size={s.batch_size} must be a multiple of mesh data x fsdp = {shards}"
        )
    try:
        model, _ = lora.load_merged(model_dir, mesh=mesh, dtype=s.dtype, param_dtype=s.dtype)
    except (hf.CheckpointError, ValueError) as e:
        raise EvalError(f"--model: {e}") from None
    stops = generation.stop_token_ids(
        tokenizer, lora.config_dir(model_dir, "generation_config.json")
    )
    gen = generation.Generator(
        model, tokenizer, s.sampling, batch_size=s.batch_size, stop_tokens=stops, mesh=mesh
    )
    for batch in gen.run(prompt_ids, set(done)):
        for key, row in batch:
            log.append(key, row_ids[key[0]], row)
            done[key] = row
        if on_batch is not None:
            on_batch(len(done))
    return gen


def run(s: Settings, *, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Runs one evaluation (resuming whatever `s.out` already holds); returns the summary.

    Args:
      s: the Settings.
      on_batch: called with the number of finished responses after each generated batch.

    Returns:
      The summary, also written to <out>/summary.json.
    """
    s.sampling.check()
    exports.check_formats(s.formats, s.sampling.num_samples, s.mixeval_benchmark)
    if s.batch_size < 1:
        raise EvalError(f"--batch_size must be positive, got {s.batch_size}")
    if s.judge is not None:
        from apo_jax.eval import judge

        judge.check(s.judge)
    from apo_jax.models import lora

    model_dir = resolve_model_dir(s.model)
    tok_dir = s.tokenizer or lora.config_dir(model_dir, "tokenizer.json")
    tokenizer = _load_tokenizer(tok_dir)
    checker = scoring.load_checker(s.checker) if s.checker else None
    os.makedirs(s.out, exist_ok=True)
    examples, prompt_ids, rejects = _prepare(s, model_dir, tokenizer)
    exports.check_rows(s.formats, examples)
    identity = {  # everything the responses depend on: a resume must keep all of it
        "weights_fingerprint": weights_fingerprint(model_dir),
        "tokenizer_fingerprint": tokenize.tokenizer_fingerprint(tok_dir),
        "prompt_field": s.prompt_field,
        "sampling": dataclasses.asdict(s.sampling),
        "batch_size": s.batch_size,  # the rows padded and sampled together
        "dtype": s.dtype,
        "mesh": list(s.mesh),
        "split": s.split,
        "prompts_fingerprint": _prompts_fingerprint(examples, prompt_ids),
    }
    progress.check_run_identity(s.out, identity)
    n = s.sampling.num_samples
    log = progress.ProgressLog(os.path.join(s.out, "progress.jsonl"))
    row_ids = {ex.index: ex.id for ex in examples}
    done = log.load(row_ids, n)
    resumed = len(done)
    gen = None
    try:
        if len(done) < len(examples) * n:
            gen = _generate(s, model_dir, tokenizer, prompt_ids, row_ids, done, log, on_batch)
    finally:
        log.close()
    rows, row_examples = [], []
    for ex in examples:
        for j in range(n):
            rows.append(generation.result_row(ex, j, done[(ex.index, j)], n))
            row_examples.append(ex)
    summary = _summary(s, model_dir, tok_dir, identity, examples, rejects, rows, resumed, gen)
    summary["corrupt_progress_lines"] = log.corrupt_lines
    _score_and_write(s, model_dir, checker, row_examples, rows, summary)
    return summary


def _score_and_write(s, model_dir, checker, row_examples, rows, summary) -> None:
    """Checker, generations.jsonl, exports, judge, then summary.json (each after the one before)."""
    if checker is not None:
        scoring.apply_checker(checker, rows, [ex.record for ex in row_examples], name=s.checker)
        summary["checker"] = scoring.accuracy(rows, s.checker)
    _write_jsonl(os.path.join(s.out, "generations.jsonl"), rows)
    name = s.model_name or default_model_name(s.model, model_dir)
    pairs = list(zip(row_examples, rows, strict=True)) if s.sampling.num_samples == 1 else []
    summary["exports"] = exports.write(
        s.formats,
        s.out,
        pairs,
        name,
        mixeval_benchmark=s.mixeval_benchmark,
        mixeval_version=s.mixeval_version,
    )
    if s.judge is not None:
        from apo_jax.eval import judge

        summary["judge"] = judge.run(s.judge, s.out, row_examples, rows)
    with open(os.path.join(s.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


def _summary(s, model_dir, tok_dir, identity, examples, rejects, rows, resumed, gen) -> dict:
    finish = Counter(r["finish_reason"] for r in rows)
    tokens = sum(r["num_tokens"] for r in rows)
    return {
        "model": {
            "path": os.path.abspath(model_dir),
            "fingerprint": identity["weights_fingerprint"],
        },
        "tokenizer": {
            "path": os.path.abspath(tok_dir),
            "fingerprint": identity["tokenizer_fingerprint"],
        },
        "prompts": os.path.abspath(s.prompts),
        "sampling": identity["sampling"],
        "batch_size": s.batch_size,
        "dtype": s.dtype,
        "mesh": dict(gen.mesh.shape)
        if gen
        else dict(zip(("data", "fsdp", "tensor"), s.mesh, strict=True)),
        "counts": {
            "read": len(examples) + len(rejects),
            "rejected": len(rejects),
            "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
            "prompts": len(examples),
            "responses": len(rows),
            "resumed": resumed,
            "generated": len(rows) - resumed,
            "finish_stop": finish.get("stop", 0),
            "finish_length": finish.get("length", 0),
        },
        "mean_response_tokens": tokens / len(rows) if rows else None,
        "generation": {
            "tokens": gen.generated_tokens if gen else 0,
            "seconds": gen.seconds if gen else 0.0,
            "tokens_per_sec": gen.generated_tokens / gen.seconds if gen and gen.seconds else None,
        },
    }
