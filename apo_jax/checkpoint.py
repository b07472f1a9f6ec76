"""Checkpoints: the train state and the data position, saved with orbax, resumed exactly.

A checkpoint is a directory `<workdir>/checkpoints/<step>` holding the TrainState (`state`), the
data iterator's position (`data`, JSON) and run facts (`meta`, JSON). Orbax writes into a
temporary directory and renames it when complete, so a half-written checkpoint is never listed.
A checkpoint that fails to restore is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from apo_jax.errors import UserError

log = logging.getLogger(__name__)


class RestoreError(UserError, RuntimeError):
    """No checkpoint of a run could be restored."""


class Checkpointer:
    """Saves and restores (state, data position, meta) under `directory`.

    Args:
      directory: where the step directories go.
      keep: how many of the latest checkpoints to keep.
      keep_best: also keep the checkpoint with the best value of `best_metric` (0 disables).
      best_metric: the metric saved with a checkpoint that ranks it (e.g. 'eval/loss').
      best_mode: 'min' or 'max'.
      async_save: write in a background thread while training goes on.
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        keep_best: int = 1,
        best_metric: str = "eval/loss",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",  # BestN keeps the tail of the sorted list
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts saving a checkpoint of `step` (asynchronously); every process must call it."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """Restores `step` (default: the newest that restores) onto `abstract_state`'s shardings.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (the target layout,
            which may differ from the layout the checkpoint was written with).
          step: a specific step; None tries the newest first and falls back to older ones.

        Returns:
          (step, state, data_state, meta), or None when the directory holds no checkpoint.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            return None
        errors = []
        for s in candidates:
            try:
                out = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                log.warning(
                    "checkpoint %s/%d does not restore (%s); trying an older one",
                    self.directory,
                    s,
                    e,
                )
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                continue
            return s, out["state"], dict(out["data"] or {}), dict(out["meta"] or {})
        raise RestoreError(f"no checkpoint in {self.directory} restores: " + "; ".join(errors))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a (concrete or abstract) state."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )


class StopSignal:
    """Turns SIGTERM (preemption) and SIGINT into a flag the training loop polls.

    The loop saves a checkpoint and exits cleanly when the flag is set; a second SIGINT raises
    KeyboardInterrupt as usual.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self._previous: dict[int, Callable[..., Any] | int | None] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self.signal_name: str | None = None

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        """Puts the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
