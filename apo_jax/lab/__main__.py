"""``python -m apo_jax.lab --out=DIR [--quick] [--seeds=N] [flags]``: the paper's experiment in
miniature, end to end on a CPU (docs/lab.md); with ``--target=<smollm2-135m | HF dir | .gguf>`` on
a real instruct model (`apo_jax.lab.real_run`)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

from absl import flags

from apo_jax import commands, errors
from apo_jax.lab import pipeline

USAGE = (
    "python -m apo_jax.lab [--target=<smollm2-135m | HF dir | .gguf>] --out=DIR [--quick] "
    "[--seeds=N] [--lora_rank=16] [--full] [--rounds=N] [flags]"
)
ABOUT = """\
Trains an under-trained target on a toy world with checkable answers, builds four pair sources
from its own samples (CLAIR, stronger-preferred, on-policy judge, off-policy judge) with the clair
builders, trains DPO, APO-zero, APO-down and SFT on each, scores held-out greedy answers, and
writes <out>/results.json and <out>/report.md. Every step is cached: rerun to resume.
With --target, the same design on a real instruct model: generated arithmetic task families,
a strict checker, a rule-based reviser that edits the target's own answers, LoRA cells."""
QUICK = {
    "sources": ("clair", "stronger_preferred"),
    "objectives": ("dpo", "apo_zero", "sft"),
    "seeds": 1,
    "pair_prompts": 384,
    "pairs": 128,
    "heldout": 200,
}
REAL_QUICK = {
    "sources": ("clair", "stronger_preferred"),
    "objectives": ("apo_zero", "dpo", "sft"),
    "seeds": 1,
    "test": 300,
    "pairs": 64,
    "pair_prompts_per_family": 64,
    "steps": 16,
    "val_per_family": 16,
}
TOY_ONLY = (
    "n_sft",
    "sft_noise",
    "sft_steps",
    "sft_lr",
    "model",
    "rounds",
    "heldout",
    "pair_prompts",
)
REAL_FIELDS = ("seed", "pairs", "temperature", "steps", "batch_size", "lr", "beta")
FIELDS = {f.name: f for f in dataclasses.fields(pipeline.Settings)}
HELP = {
    "seed": "world seed (questions, noise, coin flips)",
    "n_sft": "demonstrations the target is trained on",
    "sft_noise": "fraction of demonstrations with a wrong value",
    "sft_steps": "SFT steps of the target (few: under-trained)",
    "sft_lr": "learning rate of the target's SFT",
    "pair_prompts": "prompts the pair sources are built from",
    "pairs": "pairs per source, the same prompts for every source",
    "heldout": "held-out prompts scored for every model",
    "temperature": "the target's sampling temperature for its own answers",
    "steps": "training steps of every cell",
    "batch_size": "pairs per step (SFT of the target too)",
    "lr": "learning rate of every cell",
    "beta": "beta of DPO and APO",
    "model": "models/config.py preset of the target",
    "rounds": "CLAIR rounds: each later round makes the previous round's trained CLAIR model "
    "(prescribed APO variant, seed 0) the target again",
}


def _flag_values() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "output directory (steps are cached there)", flag_values=fv)
    flags.DEFINE_string(
        "target",
        None,
        "a real instruct target: smollm2-135m, an HF directory "
        "or a .gguf file (default: the toy world)",
        flag_values=fv,
    )
    flags.DEFINE_integer("lora_rank", 16, "LoRA rank of the cells (--target)", flag_values=fv)
    flags.DEFINE_boolean(
        "full", False, "full fine-tuning instead of LoRA (--target)", flag_values=fv
    )
    flags.DEFINE_integer(
        "test", None, "test prompts (--target; default 1000, --quick 300)", flag_values=fv
    )
    flags.DEFINE_boolean(
        "quick", False, "2 sources x 3 objectives x 1 seed, smaller world", flag_values=fv
    )
    flags.DEFINE_list(
        "sources", None, f"pair sources, of {','.join(pipeline.SOURCES)}", flag_values=fv
    )
    flags.DEFINE_list(
        "objectives", None, f"objectives, of {','.join(pipeline.OBJECTIVES)}", flag_values=fv
    )
    flags.DEFINE_integer("seeds", None, "training seeds per cell (full grid: 3)", flag_values=fv)
    for name, meaning in HELP.items():
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
            type(FIELDS[name].default), flags.DEFINE_string
        )
        define(name, None, f"{meaning} (default {FIELDS[name].default})", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show the progress bar with ETA", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    commands.positive(
        fv,
        "seeds",
        "n_sft",
        "sft_steps",
        "pair_prompts",
        "pairs",
        "heldout",
        "steps",
        "batch_size",
        "rounds",
        "lora_rank",
        "test",
    )
    return fv


class LabError(errors.UserError):
    """Lab settings that cannot work."""


def settings(fv: flags.FlagValues) -> pipeline.Settings:
    """The Settings of the command line: the defaults, --quick's, then every flag given."""
    chosen = dict(QUICK) if fv.quick else {}
    for name in ("sources", "objectives", "seeds", *HELP):
        if fv[name].value is not None:
            chosen[name] = (
                tuple(fv[name].value) if name in ("sources", "objectives") else fv[name].value
            )
    for name, allowed in (("sources", pipeline.SOURCES), ("objectives", pipeline.OBJECTIVES)):
        bad = [x for x in chosen.get(name, ()) if x not in allowed]
        if bad or (name in chosen and not chosen[name]):
            raise LabError(f"--{name}: {','.join(bad) or 'empty'}; choose from {','.join(allowed)}")
    s = pipeline.Settings(**chosen)
    if not 0 <= s.sft_noise < 1 or s.temperature <= 0 or s.lr <= 0 or s.beta <= 0:
        raise LabError("need 0 <= --sft_noise < 1 and --temperature, --lr, --beta > 0")
    if s.rounds > 1 and "clair" not in s.sources:
        raise LabError("--rounds > 1 continues the CLAIR cell: add clair to --sources")
    if s.pairs > s.pair_prompts:
        raise LabError(f"--pairs={s.pairs} exceeds --pair_prompts={s.pair_prompts}")
    return s


def real_settings(fv: flags.FlagValues):
    """The RealSettings of the command line (--target): defaults, --quick's, then the flags."""
    from apo_jax.lab.real import RealSettings

    given = [n for n in TOY_ONLY if fv[n].value is not None]
    if given:
        raise LabError(f"--{given[0]} is a toy-world flag; it does not apply with --target")
    chosen: dict = dict(REAL_QUICK) if fv.quick else {}
    for name in ("sources", "objectives", "seeds", "test", *REAL_FIELDS):
        if fv[name].value is not None:
            v = fv[name].value
            chosen[name] = tuple(v) if name in ("sources", "objectives") else v
    for name, allowed in (("sources", pipeline.SOURCES), ("objectives", pipeline.OBJECTIVES)):
        bad = [x for x in chosen.get(name, ()) if x not in allowed]
        if bad or (name in chosen and not chosen[name]):
            raise LabError(f"--{name}: {','.join(bad) or 'empty'}; choose from {','.join(allowed)}")
    s = RealSettings(**chosen, lora_rank=fv.lora_rank, full=fv.full)
    if s.temperature <= 0 or s.lr <= 0 or s.beta <= 0:
        raise LabError("need --temperature, --lr, --beta > 0")
    return s


def _compilation_cache(out: str) -> None:
    """Every cell compiles the same few programs: keep them in <out>/jax_cache (unless set)."""
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update(
            "jax_compilation_cache_dir", os.path.join(os.path.abspath(out), "jax_cache")
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(argv: Sequence[str]) -> int:
    from apo_jax.lab import run as lab_run

    fv = _flag_values()
    if commands.parse(fv, argv, USAGE, ABOUT)[1:]:
        raise commands.FlagError(f"unexpected arguments {list(argv)[1:]}: use --out=DIR")
    if fv.target is not None:
        return _run_real(fv, argv)
    s = settings(fv)
    logging.getLogger("apo_jax").setLevel(logging.WARNING)
    _compilation_cache(fv.out)
    results = lab_run.run(fv.out, s, progress=fv.progress)
    for r in results.get("rounds", [])[1:]:
        print(
            f"round {r['round']}: {r['accuracy']:.3f}, {r['delta']:+.3f} "
            f"[{r['delta_ci95'][0]:+.3f}, {r['delta_ci95'][1]:+.3f}] over round {r['round'] - 1}"
        )
    print(
        f"target {results['baseline']['accuracy']:.3f}; "
        f"claim (i) {results['claims']['contrastive']['verdict']}, "
        f"claim (ii) {results['claims']['anchored']['verdict']}; "
        f"{fv.out}/report.md ({results['seconds'] / 60:.1f} min)"
    )
    return 0


def _run_real(fv: flags.FlagValues, argv: Sequence[str]) -> int:
    import shlex

    from apo_jax.lab import real_run

    s = real_settings(fv)
    logging.getLogger("apo_jax").setLevel(logging.WARNING)
    _compilation_cache(fv.out)
    command = "python -m apo_jax.lab " + " ".join(shlex.quote(a) for a in list(argv)[1:])
    sweep = not fv.quick and fv["lr"].value is None  # --lr given: no sweep
    results = real_run.run(fv.out, s, fv.target, sweep=sweep, progress=fv.progress, command=command)
    print(
        f"target {results['baseline']['accuracy']:.3f}; "
        f"claim (i) {results['claims']['contrastive']['verdict']}, "
        f"claim (ii) {results['claims']['anchored']['verdict']}; "
        f"{fv.out}/report.md ({results['seconds'] / 60:.1f} min)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return errors.guard(lambda: run(sys.argv if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
