"""The training commands: `python -m apo_jax.train` and `python -m apo_jax.reference`.

Flags (`--config=configs/<objective>.py[:preset]`, `--config.<field>=value`, `--workdir`), the
console summary and the user-error mapping live here and nowhere else; the library
(`apo_jax.trainer`) never imports this module. Errors a user can fix print one line and exit 2
(`apo_jax.errors`); `APO_JAX_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from apo_jax import commands, distributed, errors, trainer

log = logging.getLogger("apo_jax")

TRAIN_USAGE = "python -m apo_jax.train --config=configs/<objective>.py[:preset] [--config.<field>=value ...] [--workdir=DIR]"
TRAIN_ABOUT = """Trains a preference objective; with no data or model paths, the embedded demo on a CPU.
Restarting the same command resumes from the newest complete checkpoint in the workdir.
Every config field and its meaning: docs/training.md."""
REFERENCE_USAGE = "python -m apo_jax.reference --config=configs/<objective>.py[:preset] [--config.<field>=value ...]"
REFERENCE_ABOUT = """Computes the frozen reference model's log-probs of every pair once and stores them
beside the train and eval shards (what training does first when none match)."""


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        "configs/apo_down.py",
        "Run config: configs/<objective>.py[:preset]; set any field with --config.<field>=value.",
        flag_values=fv,
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir", "", "Checkpoints, metrics and exports (default runs/<loss>_<preset>).",
        flag_values=fv,
    )  # fmt: skip
    return fv


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


def _run(argv: Sequence[str], usage: str, about: str, fn: Callable[[Any, str], Any]) -> Any:
    fv = _flags()
    if commands.parse(fv, argv, usage, about)[1:]:
        raise commands.FlagError(
            f"unexpected arguments {list(argv)[1:]}: flags are --flag_name=value"
        )
    _setup_logging()
    distributed.initialize(fv.config.get("distributed"))  # before any device is touched
    import jax

    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)  # process 0 narrates; the others only warn
    return fn(fv.config, fv.workdir)


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
    if s.get("hf_export"):
        lines.append(f"  Hugging Face export: {s['hf_export']}")
    if s.get("plots"):
        lines.append(f"  plots: {s['plots']}")
    for row in s.get("samples", []):
        mark = {True: "  [correct]", False: "  [wrong]"}.get(row.get("correct"), "")
        prompt, response = (" ".join(str(x).split()) for x in (row["prompt"], row["response"]))
        lines.append(f"  sample: {prompt[:70]!r} -> {response[:70]!r}{mark}")
    return "\n".join(lines)


def train_main(argv: Sequence[str] | None = None) -> None:
    """`python -m apo_jax.train`: trains and prints the summary."""
    argv = sys.argv if argv is None else argv
    summary = errors.guard(lambda: _run(argv, TRAIN_USAGE, TRAIN_ABOUT, trainer.train_and_evaluate))
    import jax

    if jax.process_index() == 0:
        print(summary_text(summary), flush=True)


def reference_main(argv: Sequence[str] | None = None) -> None:
    """`python -m apo_jax.reference`: the reference pass alone."""
    argv = sys.argv if argv is None else argv
    errors.guard(lambda: _run(argv, REFERENCE_USAGE, REFERENCE_ABOUT, trainer.precompute_reference))


def _second(s: dict, split: str) -> str:
    """The reward accuracy of pair losses; the KL estimate of unpaired ones (which have none)."""
    if f"{split}/rewards/accuracies" in s:
        return f"reward accuracy {s[f'{split}/rewards/accuracies']:.3f}"
    return f"kl {s.get(f'{split}/kl', float('nan')):.4f}"
