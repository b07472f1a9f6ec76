"""`python -m apo_jax.eval --model=DIR --prompts=FILE --out=DIR [flags]`: see docs/evaluation.md."""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

from apo_jax import commands, errors
from apo_jax.eval import runner
from apo_jax.eval.generation import Sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF checkpoint dir, training workdir (its hf/) or .gguf file.")
flags.DEFINE_string("prompts", None, "Prompt rows: .jsonl, .json, .parquet or a datasets dir.")
flags.DEFINE_string("out", None, "Output dir: generations.jsonl, summary.json, rejects.jsonl.")
flags.DEFINE_string("tokenizer", "", "Tokenizer dir (default: the model dir).")
flags.DEFINE_string("prompt_field", "prompt", "Field holding the prompt string of a row.")
flags.DEFINE_string("split", "train", "Split to read from a DatasetDict directory.")
flags.DEFINE_integer("max_new_tokens", 512, "Most tokens generated per response.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
flags.DEFINE_integer("num_samples", 1, "Responses per prompt (needs --temperature > 0).")
flags.DEFINE_integer("batch_size", 16, "Prompts per generate call (multiple of data x fsdp).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("dtype", "float32", "Weights and compute dtype: float32 or bfloat16.")
flags.DEFINE_integer("mesh_data", -1, "Mesh 'data' axis (prompts); -1 = the devices left.")
flags.DEFINE_integer("mesh_fsdp", 1, "Mesh 'fsdp' axis (weights sharded, prompts too).")
flags.DEFINE_integer("mesh_tensor", 1, "Mesh 'tensor' axis (weights sharded by heads/mlp).")
flags.DEFINE_list("format", [], "Exports: alpaca_eval, arena_hard, mixeval (comma-separated).")
flags.DEFINE_string("model_name", "", "Model name in exports (default: the model dir's name).")
flags.DEFINE_string("mixeval_benchmark", "mixeval_hard", "MixEval export: mixeval or mixeval_hard.")
flags.DEFINE_string("mixeval_version", "2024-06-01", "MixEval export: the benchmark version.")
flags.DEFINE_string("checker", "", "module:function(row, response) -> bool; adds `correct`.")
flags.DEFINE_string("judge_baseline", "", "Baseline generations.jsonl to judge against.")
flags.DEFINE_string("judge_url", "", "Judge's OpenAI-compatible base URL (e.g. .../v1).")
flags.DEFINE_string("judge_model", "", "Judge model name.")
flags.DEFINE_string("judge_api_key_env", "", "Env variable holding the judge's key ('' = none).")
flags.DEFINE_integer("judge_concurrency", 8, "Judge requests in flight.")
flags.DEFINE_integer("judge_max_tokens", 1024, "Most tokens of a judge reply.")
flags.DEFINE_float("judge_rpm", 0.0, "Judge requests per minute (0 = no limit).")
flags.DEFINE_string("baseline_name", "baseline", "Name of the baseline in the judge summary.")
for _name in ("model", "prompts", "out"):
    flags.mark_flag_as_required(_name)


def settings_from_flags() -> runner.Settings:
    """The runner Settings of the parsed flags."""
    judge = None
    if FLAGS.judge_baseline:
        from apo_jax.eval import judge as judge_lib

        judge = judge_lib.JudgeSettings(
            baseline=FLAGS.judge_baseline,
            url=FLAGS.judge_url,
            model=FLAGS.judge_model,
            api_key_env=FLAGS.judge_api_key_env,
            concurrency=FLAGS.judge_concurrency,
            max_tokens=FLAGS.judge_max_tokens,
            rpm=FLAGS.judge_rpm or None,
            baseline_name=FLAGS.baseline_name,
        )
    return runner.Settings(
        model=FLAGS.model,
        prompts=FLAGS.prompts,
        out=FLAGS.out,
        tokenizer=FLAGS.tokenizer,
        sampling=Sampling(
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            num_samples=FLAGS.num_samples,
            seed=FLAGS.seed,
        ),
        batch_size=FLAGS.batch_size,
        prompt_field=FLAGS.prompt_field,
        split=FLAGS.split,
        dtype=FLAGS.dtype,
        mesh=(FLAGS.mesh_data, FLAGS.mesh_fsdp, FLAGS.mesh_tensor),
        checker=FLAGS.checker,
        formats=tuple(FLAGS.format),
        model_name=FLAGS.model_name,
        mixeval_benchmark=FLAGS.mixeval_benchmark,
        mixeval_version=FLAGS.mixeval_version,
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # jax narrates backend probing at INFO
    commands.use_compile_cache()
    _print(errors.guard(lambda: runner.run(settings_from_flags())))


if __name__ == "__main__":
    app.run(main)
