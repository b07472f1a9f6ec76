"""`python -m apo_jax.train --config=configs/apo_down.py[:preset] [--workdir=DIR] [--config.x=v]`.

With no data or model paths the config trains the embedded demo on a CPU. Restarting the same
command resumes from the newest complete checkpoint in the workdir.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from apo_jax import distributed, reference, run_config, sharding, trainer
from apo_jax import train_step as ts
from apo_jax.checkpoint import CheckpointError
from apo_jax.data.refs import ReferenceMismatchError
from apo_jax.loop import Loop
from apo_jax.models.config import ConfigError as ModelConfigError
from apo_jax.models.hf import CheckpointError as HFCheckpointError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    "configs/apo_down.py",
    "Run config: configs/<objective>.py[:preset].",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir", "", "Checkpoints, metrics and exports (default runs/<loss>_<preset>)."
)
log = logging.getLogger("apo_jax")

USER_ERRORS = (
    distributed.DistributedError,
    run_config.ConfigError,
    ModelConfigError,
    HFCheckpointError,
    CheckpointError,
    ReferenceMismatchError,
    FileNotFoundError,
)


def default_workdir(config: Any) -> str:
    name = str(config.loss.name).replace(" ", "").replace("*", "x").replace("+", "_")
    return os.path.join("runs", f"{name}_{config.preset}")


def setup(config: Any, workdir: str) -> trainer.Built:
    """Validates the config and builds everything the loop needs (reference pass included)."""
    rc = run_config.validate(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    paths = trainer.resolve_data(rc)
    mesh = sharding.make_mesh(*rc.mesh)
    model, model_cfg, weights_fp = trainer.build_model(rc, paths, mesh)
    graphdef, params = ts.split_model(model)
    info = reference.fingerprint_info(paths.train, weights_fp, rc.reference["dtype"])
    ref_mode = trainer.reference_mode(rc)
    ref_graphdef = trainer.reference_graphdef(rc, graphdef, model_cfg)
    ref_params = None
    if ref_mode != "none":
        ref_params = trainer.frozen_reference(params, rc.reference["dtype"])
    if ref_mode == "precomputed":
        for shard_dir in filter(None, (paths.train, paths.eval)):
            if not reference.stored_matches(shard_dir, info):
                log.info(
                    "no matching reference log-probs beside %s: computing them first", shard_dir
                )
                reference.compute_and_store(
                    shard_dir,
                    ref_graphdef,
                    ref_params,
                    mesh,
                    info,
                    batch_size=rc.batch_size,
                    seq_len=rc.data["seq_len"] or None,
                    chunk=rc.logprob_chunk,
                )
        ref_params = None  # read from the data from now on: one model in memory
    return trainer.Built(
        rc,
        workdir,
        paths,
        mesh,
        graphdef,
        params,
        ref_graphdef,
        ref_params,
        ref_mode,
        info,
        model_cfg,
    )


def run(config: Any, workdir: str = "") -> dict[str, Any]:
    """Trains per `config` in `workdir`; returns the summary (also printed by the command)."""
    return Loop(setup(config, workdir or default_workdir(config))).run()


def run_reference_only(config: Any, workdir: str = "") -> None:
    """The reference pass of `config` alone (what `python -m apo_jax.reference` runs)."""
    config.unlock()
    config.reference.mode = "precomputed"
    setup(config, workdir or default_workdir(config))


def _print_summary(s: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    lines = [
        "",
        f"apo_jax: {s['loss']} on {s['data']}",
        f"  steps {s['steps']} ({s['skipped']} skipped), {s['seconds']:.1f} s, "
        f"{s['tokens_per_sec']:,.0f} tokens/s",
    ]
    if "train/loss" in s:
        lines.append(
            f"  train: loss {s['train/loss']:.4f}, reward accuracy {s['train/rewards/accuracies']:.3f}"
        )
    else:
        lines.append("  no step to run: the checkpoint already holds every step of this config")
    if "eval/loss" in s:
        lines.append(
            f"  held-out: loss {s['eval/loss']:.4f}, reward accuracy {s['eval/rewards/accuracies']:.3f}, "
            f"margin {s['eval/rewards/margins']:.4f}"
        )
    lines.append(f"  checkpoint: {s['checkpoint']}")
    if s.get("hf_export"):
        lines.append(f"  Hugging Face export: {s['hf_export']}")
    print("\n".join(lines), flush=True)


def command(fn: Any) -> Any:
    """Runs `fn(config, workdir)` as a command: quiet libraries, distributed start, one-line errors."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain narrate every save at INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("apo_jax: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        distributed.initialize(FLAGS.config.get("distributed"))  # before any device is touched
        if jax.process_index() != 0:
            log.setLevel(logging.WARNING)  # process 0 narrates; the others only warn
        return fn(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _print_summary(command(run))


if __name__ == "__main__":
    app.run(main)
