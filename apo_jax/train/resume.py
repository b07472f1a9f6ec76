"""What a run checks and restores when its workdir already holds checkpoints.

A resume keeps the config fields that define the run and the data it was trained on
(`apo_jax.train.workdir`: refused in one line unless --allow_config_change, and then recorded),
restores the newest checkpoint that restores (the whole train state, TR-DPO's reference included),
moves the loader to that checkpoint's position, and puts LoRA adapters only onto their own base.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from apo_jax.train import model as model_lib
from apo_jax.train import train_step as ts
from apo_jax.train import workdir as workdir_lib
from apo_jax.train.checkpoint import Checkpointer, abstract_like

log = logging.getLogger("apo_jax")


def has_checkpoint(workdir: str) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def check_config(config: Any, workdir: str, allow: bool) -> dict[str, list[Any]]:
    """Refuses a resume that changes what defines the run (unless `allow`); returns the
    changes. The caller keeps the config once the run has restored (`workdir.write_config`)."""
    new = config.to_dict()
    changes = workdir_lib.check_resume(workdir, new, allow=allow) if has_checkpoint(workdir) else {}
    if changes:
        log.warning(
            "resuming %s with a changed config (--allow_config_change): %s",
            workdir,
            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
        )
    return changes


def check_data(workdir: str, data_fp: Mapping[str, str], allow: bool) -> dict[str, list[Any]]:
    """Refuses (unless `allow`) other data than the newest checkpoint's, read without restoring
    it, so that a resume on other data stops before the reference pass; returns the changes."""
    if not has_checkpoint(workdir):
        return {}
    meta = workdir_lib.newest_checkpoint_meta(workdir)
    return workdir_lib.check_data(
        meta.get(workdir_lib.DATA_KEY), data_fp, allow=allow, where=f"{workdir}/checkpoints"
    )


def restore(
    ckpt: Checkpointer, state: ts.TrainState, data: Any, base: Mapping[str, str]
) -> tuple[int, ts.TrainState, dict[str, Any]]:
    """(step, state, meta) of the newest checkpoint that restores, the loader moved to its
    position; (0, state, {}) when there is none. LoRA adapters resume only onto the base they
    were trained on."""
    restored = ckpt.restore(abstract_like(state))
    if restored is None:
        return 0, state, {}
    step, state, data_state, meta = restored
    if base:
        model_lib.check_base(meta.get("base"), dict(base), f"checkpoint {ckpt.directory}/{step}")
    data.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, step)
    return step, state, meta
