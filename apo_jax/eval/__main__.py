"""Generation on prompt rows, with scoring, exports and a pairwise judge: see docs/evaluation.md."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging

from apo_jax import commands, errors
from apo_jax.eval import runner
from apo_jax.eval.generation import Sampling

USAGE = "python -m apo_jax.eval --model=DIR --prompts=FILE --out=DIR [flags]"


def flag_values() -> flags.FlagValues:
    """The command's flags, in their own FlagValues (see apo_jax.commands)."""
    fv = flags.FlagValues()
    kw = {"flag_values": fv}
    flags.DEFINE_string(
        "model", None, "HF checkpoint dir, training workdir (its hf/) or .gguf file.", **kw
    )
    flags.DEFINE_string(
        "prompts", None, "Prompt rows: .jsonl, .json, .parquet or a datasets dir.", **kw
    )
    flags.DEFINE_string(
        "out", None, "Output dir: generations.jsonl, summary.json, rejects.jsonl.", **kw
    )
    flags.DEFINE_string("tokenizer", "", "Tokenizer dir (default: the model dir).", **kw)
    flags.DEFINE_string("prompt_field", "prompt", "Field holding the prompt string of a row.", **kw)
    flags.DEFINE_string("split", "train", "Split to read from a DatasetDict directory.", **kw)
    flags.DEFINE_integer("max_new_tokens", 512, "Most tokens generated per response.", **kw)
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", **kw)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).", **kw)
    flags.DEFINE_integer("num_samples", 1, "Responses per prompt (needs --temperature > 0).", **kw)
    flags.DEFINE_integer(
        "batch_size", 16, "Prompts per generate call (multiple of data x fsdp).", **kw
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **kw)
    flags.DEFINE_string("dtype", "float32", "Weights and compute dtype: float32 or bfloat16.", **kw)
    flags.DEFINE_integer(
        "mesh_data", -1, "Mesh 'data' axis (prompts); -1 = the devices left.", **kw
    )
    flags.DEFINE_integer("mesh_fsdp", 1, "Mesh 'fsdp' axis (weights sharded, prompts too).", **kw)
    flags.DEFINE_integer(
        "mesh_tensor", 1, "Mesh 'tensor' axis (weights sharded by heads/mlp).", **kw
    )
    flags.DEFINE_list(
        "format", [], "Exports: alpaca_eval, arena_hard, mixeval (comma-separated).", **kw
    )
    flags.DEFINE_string(
        "model_name", "", "Model name in exports (default: the model dir's name).", **kw
    )
    flags.DEFINE_string(
        "mixeval_benchmark", "mixeval_hard", "MixEval export: mixeval or mixeval_hard.", **kw
    )
    flags.DEFINE_string(
        "mixeval_version", "2024-06-01", "MixEval export: the benchmark version.", **kw
    )
    flags.DEFINE_string(
        "checker", "", "module:function(row, response) -> bool; adds `correct`.", **kw
    )
    flags.DEFINE_string("judge_baseline", "", "Baseline generations.jsonl to judge against.", **kw)
    flags.DEFINE_string("judge_url", "", "Judge's OpenAI-compatible base URL (e.g. .../v1).", **kw)
    flags.DEFINE_string("judge_model", "", "Judge model name.", **kw)
    flags.DEFINE_string(
        "judge_api_key_env", "", "Env variable holding the judge's key ('' = none).", **kw
    )
    flags.DEFINE_integer("judge_concurrency", 8, "Judge requests in flight.", **kw)
    flags.DEFINE_integer("judge_max_tokens", 1024, "Most tokens of a judge reply.", **kw)
    flags.DEFINE_float("judge_rpm", 0.0, "Judge requests per minute (0 = no limit).", **kw)
    flags.DEFINE_string(
        "baseline_name", "baseline", "Name of the baseline in the judge summary.", **kw
    )
    for name in ("model", "prompts", "out"):
        flags.mark_flag_as_required(name, flag_values=fv)
    return fv


def settings_from_flags(fv: flags.FlagValues) -> runner.Settings:
    """The runner Settings of the parsed flags."""
    judge = None
    if fv.judge_baseline:
        from apo_jax.eval import judge as judge_lib

        judge = judge_lib.JudgeSettings(
            baseline=fv.judge_baseline,
            url=fv.judge_url,
            model=fv.judge_model,
            api_key_env=fv.judge_api_key_env,
            concurrency=fv.judge_concurrency,
            max_tokens=fv.judge_max_tokens,
            rpm=fv.judge_rpm or None,
            baseline_name=fv.baseline_name,
        )
    return runner.Settings(
        model=fv.model,
        prompts=fv.prompts,
        out=fv.out,
        tokenizer=fv.tokenizer,
        sampling=Sampling(
            max_new_tokens=fv.max_new_tokens,
            temperature=fv.temperature,
            top_p=fv.top_p,
            num_samples=fv.num_samples,
            seed=fv.seed,
        ),
        batch_size=fv.batch_size,
        prompt_field=fv.prompt_field,
        split=fv.split,
        dtype=fv.dtype,
        mesh=(fv.mesh_data, fv.mesh_fsdp, fv.mesh_tensor),
        checker=fv.checker,
        formats=tuple(fv.format),
        model_name=fv.model_name,
        mixeval_benchmark=fv.mixeval_benchmark,
        mixeval_version=fv.mixeval_version,
        judge=judge,
    )


def _print(summary: dict) -> None:
    c, g = summary["counts"], summary["generation"]
    lines = [
        f"apo_jax.eval: {c['responses']} responses to {c['prompts']} prompts "
        f"({c['generated']} generated, {c['resumed']} resumed), {c['rejected']} rows rejected",
        f"  finish: {c['finish_stop']} stop, {c['finish_length']} length; "
        f"mean {summary['mean_response_tokens'] or 0:.1f} tokens",
    ]
    if g["tokens_per_sec"]:
        lines.append(
            f"  {g['tokens']} tokens in {g['seconds']:.1f} s: {g['tokens_per_sec']:,.0f} tokens/s"
        )
    if "checker" in summary:
        ch = summary["checker"]
        lo, hi = ch["ci95"] or (0.0, 0.0)
        lines.append(
            f"  accuracy {ch['accuracy']:.3f} (95% CI {lo:.3f} to {hi:.3f}), n={ch['count']}"
        )
    if "judge" in summary:
        j = summary["judge"]
        if j["win_rate"] is not None:
            lo, hi = j["ci95"]
            lines.append(
                f"  win rate vs {j['baseline_name']}: {j['win_rate']:.3f} (95% CI {lo:.3f} to "
                f"{hi:.3f}), {j['pairs_scored']} pairs"
            )
    for fmt, paths in summary.get("exports", {}).items():
        lines.append(f"  {fmt}: {', '.join(paths)}")
    print("\n".join(lines), flush=True)


def run(argv: Sequence[str]) -> dict:
    """Parses the flags, generates (and scores, exports, judges) and prints the summary.

    Raises:
      UserError: a flag that does not parse, or input the runner refuses.
    """
    fv = flag_values()
    if commands.parse(fv, argv, USAGE, __doc__.splitlines()[0])[1:]:
        raise commands.FlagError(f"unexpected arguments {list(argv)[1:]}: use --prompts=FILE")
    absl_logging.set_verbosity(absl_logging.WARNING)  # jax narrates backend probing at INFO
    commands.use_compile_cache()
    summary = runner.run(settings_from_flags(fv))
    _print(summary)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """The command: :func:`run` under :func:`apo_jax.errors.guard` (one-line errors)."""
    errors.guard(lambda: run(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
