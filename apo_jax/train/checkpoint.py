"""Checkpoints: the train state and the data position, saved with orbax, resumed exactly.

A checkpoint is a directory `<workdir>/checkpoints/<step>` holding the TrainState (`state`), the
data iterator's position (`data`, JSON) and run facts (`meta`, JSON). Orbax writes into a
temporary directory and renames it when complete, so a half-written checkpoint is never listed.
A checkpoint that fails to restore is moved aside to `<step>.damaged` with a two-line warning naming
the step and the damaged file, and the one before it is restored; when none restores, one error line.
Each committed step also gets `apo_jax_files.json` (size and sha256 of its files), checked before
it is restored, so a deleted, truncated or bit-flipped file is named (orbax keeps no checksums).
A failed asynchronous save (a full disk) is reported in one line by `poll()` at the next step; the
checkpoints before it are kept. Orbax's own log records, and the exceptions of its reads left in
flight by a failed restore, are dropped (`APO_JAX_DEBUG=1` shows them): every failure they
describe is reported here in one line.

`EXIT_STOPPED` (75, EX_TEMPFAIL) is the exit status of a run stopped by a signal before its last
step, after its checkpoint was committed: resumable, not finished (SLURM requeue keys on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from apo_jax import atomic, errors
from apo_jax.errors import UserError

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, checkpoint committed, resumable
DAMAGED_SUFFIX = ".damaged"
_ITEMS = ("state", "data", "meta")
FILES_RECORD = "apo_jax_files.json"  # <step>/: size and sha256 of each file, checked on restore


class RestoreError(UserError, RuntimeError):
    """No checkpoint of a run could be restored."""


class SaveError(UserError, OSError):
    """An (asynchronous) checkpoint save failed, e.g. on a full disk."""


class _DropOrbaxRecords(logging.Filter):
    """Drops orbax's absl log records (tracebacks of failed saves and restores, which this
    module reports in one line), unless APO_JAX_DEBUG is set."""

    def filter(self, record: logging.LogRecord) -> bool:
        return errors.debug() or f"{os.sep}orbax{os.sep}" not in record.pathname


def _orbax_leftover(unraisable: Any) -> bool:
    """An exception orbax could not raise: the reads still in flight when a damaged checkpoint's
    restore failed (one per array), or their event loop already closed."""
    tb, frames = unraisable.exc_traceback, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    closed = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value
    )
    return closed or any(f"{os.sep}orbax{os.sep}" in f for f in frames)


def _quiet_orbax() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxRecords) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxRecords())
    previous = sys.unraisablehook
    if getattr(previous, "_apo_jax", False):
        return

    def hook(unraisable: Any) -> None:
        if errors.debug() or not _orbax_leftover(unraisable):
            previous(unraisable)

    hook._apo_jax = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


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
        _quiet_orbax()
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self.pending: int | None = None  # the step of a save started and not yet committed
        self.failed: SaveError | None = None

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts saving a checkpoint of `step` (asynchronously); every process must call it.

        Raises:
          SaveError: this save, or the one before it, failed (one line naming the directory).
        """
        self.wait()  # orbax waits for the previous save anyway; this reports its failure
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        self.pending = step
        try:
            started = self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - a synchronous save fails here
            raise self._save_failed(e) from None
        if not self.manager.is_saving_in_progress():
            self.wait()
        return started

    def poll(self) -> None:
        """Called every step: raises the failure of a finished asynchronous save (SaveError)."""
        if self.pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _save_failed(self, e: BaseException) -> SaveError:
        self.manager.reload()  # orbax drops steps from its list when a save fails
        good = self.steps()
        detail = errors.one_line(e)
        if isinstance(e, OSError) and e.strerror:
            detail = f"[Errno {e.errno}] {e.strerror}"
        self.failed = SaveError(
            f"saving checkpoint {self.directory}/{self.pending} failed: {detail}; "
            + (f"the last good checkpoint is step {good[-1]}" if good else "no checkpoint kept")
            + ": free space (or fix the directory) and rerun the same command to resume"
        )
        self.pending = None
        return self.failed

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def _restore_step(self, step: int, abstract_state: Any) -> Any:
        return self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """Restores `step` (default: the newest that restores) onto `abstract_state`'s shardings.

        A newer checkpoint that fails while an older one restores is damaged: it is moved aside
        to `<step>.damaged` (so the run can save that step again) with a warning naming the file.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (the target layout,
            which may differ from the layout the checkpoint was written with).
          step: a specific step; None tries the newest first and falls back to older ones.

        Returns:
          (step, state, data_state, meta), or None when the directory holds no checkpoint.

        Raises:
          RestoreError: no checkpoint restores (one line; nothing is moved).
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            return None
        failed: list[tuple[int, str]] = []
        for s in candidates:
            damaged = self._damaged_file(s)
            if damaged:
                failed.append((s, damaged))
                continue
            try:
                out = self._restore_step(s, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                failed.append((s, self._diagnose(s, e)))
                continue
            for bad, why in failed:
                self._set_aside(bad, why, s)
            return s, out["state"], dict(out["data"] or {}), dict(out["meta"] or {})
        listed = "; ".join(f"step {s}: {why}" for s, why in failed)
        raise RestoreError(
            f"no checkpoint in {self.directory} restores ({listed}): if the config changed, "
            "rerun with the old one; else move the directory aside to start over"
        )

    def _diagnose(self, step: int, e: BaseException) -> str:
        """'<file>: <reason>' for a step that does not restore, as short as the error allows."""
        step_dir = os.path.join(self.directory, str(step))
        chain, x = [], e
        while x is not None and len(chain) < 8:  # tensorstore's own error is in the context
            chain.append(errors.one_line(x).split(" [tensorstore_spec")[0])
            x = x.__cause__ or x.__context__
        text = " | ".join(reversed(chain))
        reason = text.split(" | ")[0].rsplit(": ", 1)[-1][:160]
        files = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith("/")]
        if files:
            return f"{files[-1]}: {reason}"
        sizes = {int(n) for n in re.findall(r"value of size (\d+)", text)}
        for root, _, names in os.walk(step_dir):
            for name in sorted(names):
                path = os.path.join(root, name)
                if os.path.getsize(path) in sizes:
                    return f"{path}: {reason}"
        for item in _ITEMS:
            if not os.path.isdir(os.path.join(step_dir, item)):
                return f"{os.path.join(step_dir, item)} is missing"
        for root, _, names in os.walk(step_dir):
            for name in sorted(names):
                path = os.path.join(root, name)
                if name in ("_METADATA", "_CHECKPOINT_METADATA", "metadata", "_sharding"):
                    try:
                        with open(path, encoding="utf-8") as f:
                            json.load(f)
                    except (OSError, ValueError) as bad:
                        return f"{path}: {type(bad).__name__}: {errors.one_line(bad)}"[:300]
        return f"{step_dir}: {type(e).__name__}: {chain[0]}"[:300]

    def _set_aside(self, step: int, why: str, restored: int) -> None:
        """Moves the damaged `step` to `<step>.damaged` (process 0; the others wait)."""
        src = os.path.join(self.directory, str(step))
        dst = src + DAMAGED_SUFFIX
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(dst):
                dst, n = f"{src}{DAMAGED_SUFFIX}.{n}", n + 1
            os.replace(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()
        log.warning(
            "checkpoint step %d is damaged (%s);\n  moved it to %s and resumed from step %d",
            step,
            why,
            dst,
            restored,
        )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete.

        Raises:
          SaveError: the save failed (reported once; later calls return).
        """
        if self.failed is not None:
            return
        try:
            self.manager.wait_until_finished()
            if self.pending is not None and self.pending in self.manager.all_steps():
                self._record_files(self.pending)
        except Exception as e:  # noqa: BLE001 - orbax re-raises the writer thread's error
            raise self._save_failed(e) from None
        self.pending = None

    def _record_files(self, step: int) -> None:
        """Writes `<step>/FILES_RECORD`: the size and sha256 of every file of a committed step
        (process 0), so a restore names a deleted, truncated or bit-flipped file (orbax keeps no
        checksums: a flipped bit in a data file would otherwise restore silently)."""
        if jax.process_index() != 0:
            return
        step_dir = os.path.join(self.directory, str(step))
        record = {rel: [os.path.getsize(path), _sha256(path)] for rel, path in _files(step_dir)}
        atomic.write_file(
            os.path.join(step_dir, FILES_RECORD),
            lambda tmp: _write_json(tmp, {"format": 1, "files": record}),
        )

    def _damaged_file(self, step: int) -> str | None:
        """'<file>: <what>' for the first file of `step` that differs from its record (None when
        every file matches, or the step has no record: saved by an older version)."""
        step_dir = os.path.join(self.directory, str(step))
        try:
            with open(os.path.join(step_dir, FILES_RECORD), encoding="utf-8") as f:
                record = dict(json.load(f)["files"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{os.path.join(step_dir, FILES_RECORD)}: unreadable ({type(e).__name__})"
        for rel, (size, digest) in sorted(record.items()):
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                return f"{path} is missing"
            if os.path.getsize(path) != size:
                return f"{path}: {os.path.getsize(path)} bytes, {size} when saved (truncated?)"
            if _sha256(path) != digest:
                return f"{path}: its sha256 differs from when it was saved (damaged)"
        return None

    def close(self) -> None:
        """Waits for a save in flight, then closes the manager (a failed save is not raised
        again)."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure was reported by wait()
                if self.failed is None:
                    raise


def _files(step_dir: str) -> list[tuple[str, str]]:
    """(relative path, path) of every file under `step_dir` but the record itself."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != FILES_RECORD:
                out.append((rel, path))
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a (concrete or abstract) state."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )


class StopSignal:
    """Turns SIGTERM (preemption) and SIGINT into a flag the training loop polls.

    The first signal sets the flag: the loop finishes its step, saves a checkpoint, waits for it
    to be committed and exits with `EXIT_STOPPED`. A second signal only says that the save is
    being finished (it is never interrupted half-way); a third abandons it: `on_abandon` runs and
    the process exits with `EXIT_STOPPED` at once, leaving only orbax's temporary directory, which
    is never listed as a checkpoint and is removed by the next run.
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
        on_abandon: Callable[[], Any] | None = None,
    ):
        self._event = threading.Event()
        self._previous: dict[int, Callable[..., Any] | int | None] = {}
        self.count = 0
        self.on_abandon = on_abandon
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self.signal_name: str | None = None
        # The step a signal arriving now stops after, kept by the training loop (the console
        # log runs a step or two behind the steps dispatched, so "this step" would mislead).
        self.stop_step: int | None = None
        self.signal_step: int | None = None  # stop_step when the first signal came

    def _handle(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.signal_name = name
            self._event.set()
            self.signal_step = self.stop_step
            which = "this step" if self.stop_step is None else f"step {self.stop_step}"
            print(
                f"apo_jax: {name}: stopping after {which} with a checkpoint (a second signal "
                "waits for it, a third abandons it)",
                file=sys.stderr,
                flush=True,
            )
        elif self.count == 2:
            print(
                f"apo_jax: {name} again: finishing the checkpoint save in flight, then stopping "
                "(a third signal abandons it)",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"apo_jax: {name}: abandoning the save in flight; the newest committed "
                "checkpoint is kept",
                file=sys.stderr,
                flush=True,
            )
            if self.on_abandon is not None:
                self.on_abandon()
            os._exit(EXIT_STOPPED)

    def __bool__(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        """Puts the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
