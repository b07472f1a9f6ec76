"""The training commands: `python -m apo_jax.train` and `python -m apo_jax.reference`.

Flags (`--config=<built-in name or file>[:preset]`, which `apo_jax.config.files` resolves,
`--config.<field>=value`, `--workdir`), the console summary and the user-error mapping live here
and nowhere else; the library (`apo_jax.train.loop`) never imports this module. Errors a user can
fix print one line and exit 2 (`apo_jax.errors`); `APO_JAX_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from apo_jax import commands, distributed, errors
from apo_jax.config import files as config_files
from apo_jax.train import loop
from apo_jax.train.checkpoint import EXIT_STOPPED

log = logging.getLogger("apo_jax")

DEFAULT_CONFIG = "apo_down"  # a built-in name (apo_jax.config.files)
TRAIN_USAGE = "python -m apo_jax.train --config=<built-in name or file.py>[:preset] [--config.<field>=value ...] [--workdir=DIR]"
TRAIN_ABOUT = """Trains a preference objective; with no data or model paths, the embedded demo on a CPU.
Restarting the same command resumes from the newest complete checkpoint in the workdir; a resume
that changes what defines the run is refused unless --allow_config_change is given.
Exit status: 0 finished, 2 a user error (one line), 75 stopped early by a signal (resumable).
Every config field and its meaning: docs/training.md; guarantees: docs/reliability.md."""
REFERENCE_USAGE = "python -m apo_jax.reference --config=<built-in name or file.py>[:preset] [--config.<field>=value ...]"
REFERENCE_ABOUT = """Computes the frozen reference model's log-probs of every pair once and stores them
beside the train and eval shards (what training does first when none match)."""


def _flags(train: bool, argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "Run config: a built-in name or a config file, [:preset]; set any field with "
        "--config.<field>=value.",
        flag_values=fv,
        lock_config=True,
        sys_argv=list(argv),  # the --config.<field> overrides are read from these
    )
    flags.DEFINE_string(
        "workdir",
        "",
        "Checkpoints, metrics and exports (default runs/<loss>_<preset>).",
        flag_values=fv,
    )
    if train:
        flags.DEFINE_boolean(
            "allow_config_change",
            False,
            "Resume even though the config changes what defines the run (recorded in metrics.jsonl).",
            flag_values=fv,
        )
    return fv


def _with_config_path(argv: Sequence[str]) -> list[str]:
    """`argv` with its --config value (or the default) replaced by the file it names."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            argv[i] = "--config=" + config_files.resolve(arg.split("=", 1)[1])
            return argv
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = config_files.resolve(argv[i + 1])
            return argv
    return [*argv[:1], "--config=" + config_files.resolve(DEFAULT_CONFIG), *argv[1:]]


def _parse(
    argv: Sequence[str], usage: str, about: str, train: bool
) -> tuple[flags.FlagValues, list[str]]:
    """The flags (`_flags`) parsed by commands.parse, and the positional arguments; config-file
    problems are one-line FlagErrors naming the file or the field."""
    about = f"{about}\nBuilt-in configs: {', '.join(config_files.builtin_names())}."
    if not any(arg in commands.HELP_ARGS for arg in argv[1:]):
        try:
            argv = _with_config_path(argv)
        except config_files.ConfigFileError as e:
            raise commands.FlagError(str(e)) from None
    try:
        fv = _flags(train, argv)
        return fv, commands.parse(fv, argv, usage, about)
    except (AttributeError, KeyError) as e:  # ml_collections on --config.<unknown>=...
        name = str(e).strip("\"' ")
        given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
        hit = next((a for a in given if name in a[len("--config.") :].split(".")), None)
        raise commands.FlagError(
            f"unknown config field {hit[2:] if hit else name!r}: see docs/training.md for every "
            "field (or --help)"
        ) from None
    except commands.FlagError as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # an error raised by the config file
            head = text.split("Traceback (most recent call last)")[0].rstrip(" :\n")
            last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
            last = last.removesuffix("(see --help)").strip() or text.splitlines()[-2].strip()
            raise commands.FlagError(f"{errors.one_line(head)}: {last}") from None
        raise


def _setup_logging() -> None:
    if not flags.FLAGS.is_parsed():  # absl logging and grain workers read the global flags
        flags.FLAGS.mark_as_parsed()
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain narrate every save at INFO
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("apo_jax: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _run(
    argv: Sequence[str], usage: str, about: str, fn: Callable[[Any], Any], *, train: bool = False
) -> Any:
    """Parses the flags (`train`: also the training-only ones), starts logging and the
    distributed runtime, then calls `fn(flags)`."""
    fv, positional = _parse(argv, usage, about, train)
    if positional[1:]:
        raise commands.FlagError(
            f"unexpected arguments {list(argv)[1:]}: flags are --flag_name=value"
        )
    _setup_logging()
    commands.use_compile_cache()
    distributed.initialize(fv.config.get("distributed"))  # before any device is touched
    import jax

    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)  # process 0 narrates; the others only warn
    return fn(fv)


def _train(fv: flags.FlagValues) -> dict[str, Any]:
    return loop.train_and_evaluate(
        fv.config, fv.workdir, allow_config_change=fv.allow_config_change
    )


def _reference(fv: flags.FlagValues) -> Any:
    return loop.precompute_reference(fv.config, fv.workdir)


def summary_text(s: dict[str, Any]) -> str:
    """The console summary of a run (`train_and_evaluate`'s return value)."""
    lines = [
        "",
        f"apo_jax: {s['loss']} on {s['data']}",
        f"  steps {s['steps']} ({s['skipped']} skipped), {s['seconds']:.1f} s, "
        f"{s['tokens_per_sec']:,.0f} tokens/s",
    ]
    if "train/loss" in s:
        lines.append(f"  train: loss {s['train/loss']:.4f}, " + _second(s, "train"))
    else:
        lines.append("  no step to run: the checkpoint already holds every step of this config")
    if "eval/loss" in s:
        lines.append(
            f"  held-out: loss {s['eval/loss']:.4f}, {_second(s, 'eval')}, "
            f"margin {s['eval/rewards/margins']:.4f}"
        )
    lines.append(f"  checkpoint: {s['checkpoint']}")
    if s.get("finished") is False:
        lines.append(
            f"  stopped early at step {s['steps']} of {s.get('num_steps', '?')}: rerun the same "
            f"command to resume (exit status {EXIT_STOPPED})"
        )
    if s.get("hf_export"):
        lines.append(f"  Hugging Face export: {s['hf_export']}")
    if s.get("plots"):
        lines.append(f"  plots: {s['plots']}")
    lines += _samples_lines(s)
    return "\n".join(lines)


SHOWN_SAMPLES = 3  # prompts printed in the summary; the accuracy counts every sampled prompt


def _samples_lines(s: dict[str, Any]) -> list[str]:
    """The greedy samples' accuracy before training (step 0) and after, and a few of them."""
    after, before = s.get("samples") or [], s.get("samples_before") or []
    if s.get("samples_step") == 0:
        after = []  # the run has not sampled since its start
    lines = []
    for name, step, rows in (
        ("before training", 0, before),
        ("after training", s.get("samples_step"), after),
    ):
        scored = [r["correct"] for r in rows if r.get("correct") is not None]
        if scored:
            lines.append(
                f"  {name} (step {step}): {sum(scored)} of {len(scored)} held-out "
                f"prompts answered right (accuracy {sum(scored) / len(scored):.3f})"
            )
    by_prompt = {r["prompt"]: r for r in before}
    for row in (after or before)[:SHOWN_SAMPLES]:
        lines.append(f"  sample: {_one_line(row['prompt'])!r}")
        pairs = [("before", by_prompt.get(row["prompt"])), ("after", row)] if after else [("", row)]
        for name, r in pairs:
            if r is not None:
                mark = {True: "  [correct]", False: "  [wrong]"}.get(r.get("correct"), "")
                lines.append(f"    {name + ': ' if name else ''}{_one_line(r['response'])!r}{mark}")
    return lines


def _one_line(text: Any, width: int = 90) -> str:
    return " ".join(str(text).split())[:width]


def train_main(argv: Sequence[str] | None = None) -> None:
    """`python -m apo_jax.train`: trains and prints the summary."""
    argv = sys.argv if argv is None else argv
    # Ctrl-C outside the training loop (which turns it into a stop): one line, exit 130.
    summary = errors.guard(
        lambda: _run(argv, TRAIN_USAGE, TRAIN_ABOUT, _train, train=True),
        interrupted="interrupted outside the training loop",
    )
    import jax

    if jax.process_index() == 0:
        print(summary_text(summary), flush=True)
    if summary.get("finished") is False:
        sys.exit(EXIT_STOPPED)  # resumable, not done: SLURM requeue and launchers key on it


def reference_main(argv: Sequence[str] | None = None) -> None:
    """`python -m apo_jax.reference`: the reference pass alone."""
    argv = sys.argv if argv is None else argv
    errors.guard(lambda: _run(argv, REFERENCE_USAGE, REFERENCE_ABOUT, _reference))


def _second(s: dict, split: str) -> str:
    """The reward accuracy of pair losses; the KL estimate of unpaired ones (which have none)."""
    if f"{split}/rewards/accuracies" in s:
        return f"reward accuracy {s[f'{split}/rewards/accuracies']:.3f}"
    return f"kl {s.get(f'{split}/kl', float('nan')):.4f}"
