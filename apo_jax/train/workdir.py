"""The run's working directory: usable, held by one run at a time, and bound to one experiment.

- `check_usable(workdir)`: the directory exists or can be made, and is writable (one-line errors
  for a path that is a file or a directory this user cannot write).
- `Lock`: `<workdir>/run.lock` holds the pid, host and start time of the run that owns the
  workdir. A second run refuses in one line naming the holder; the lock of a dead process on the
  same host is taken over with a warning, atomically (serialized by `flock`, so two runs never
  both take it); a lock from another host cannot be checked: delete it.
- `check_resume(...)`: a resume compares the config kept in `<workdir>/config.json` with the new
  one and refuses a change to what defines the run (`RUN_DEFINING`), unless allowed explicitly;
  a workdir with checkpoints but no config.json is refused the same way.
- `check_data(...)`: a resume compares the shard fingerprints a checkpoint recorded (`DATA_KEY`
  in its meta) with the run's data, and refuses other data unless allowed explicitly.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from apo_jax import atomic
from apo_jax.config.fields import flatten
from apo_jax.errors import UserError

log = logging.getLogger("apo_jax")

LOCK_FILE = "run.lock"
TAKEOVER_SUFFIX = ".takeover"  # run.lock.takeover: flock-ed while a dead run's lock is replaced
CONFIG_FILE = "config.json"
DATA_KEY = "data_fingerprint"  # checkpoint meta: {"train": sha256, "eval": sha256 or ""}

# Config fields (dotted, or a section ending in '.') whose change makes a resume another experiment.
# The data is compared by content, not by path (`check_data`: the shards' fingerprints), so the
# same shards at another path (the demo's own, passed explicitly) are no change.
RUN_DEFINING = (
    "loss.",
    "optim.",
    "batch_size",
    "grad_accum",
    "seed",
    "num_steps",
    "data.layout",
    "data.seq_len",
    "data.num_epochs",
    "data.shuffle",
    "demo.n_train",
    "demo.n_eval",
    "demo.multi_turn",
    "demo.warm_start_steps",
    "model.preset",
    "model.hf_path",
    "lora.",
    "model.dtype",
    "model.param_dtype",
    "reference.",
)


class WorkdirError(UserError):
    """The workdir cannot be used: not a directory, not writable, or held by another run."""


class ConfigChangeError(UserError):
    """A resume with a config that changes what defines the run."""


def check_usable(workdir: str) -> None:
    """Makes `workdir` if needed and checks that this process can write into it.

    Raises:
      WorkdirError: the path is a file, or the directory cannot be made or written.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} is a file, not a directory: pass another --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"workdir {workdir} is not writable ({e.strerror or e}): pass another --workdir "
            "or fix its permissions"
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Lock:
    """`<workdir>/run.lock` for the lifetime of a run (process 0 of a multi-process run).

    Use as a context manager, or `acquire()` / `release()`.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.info, f)
        return True

    def _holder(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return dict(json.load(f))
        except (OSError, ValueError, TypeError):
            return {}  # unreadable or half-written: treated as held by an unknown run

    def _take_over(self, dead: dict[str, Any]) -> bool:
        """Replaces the lock of the dead run `dead`; False when another run got there first.

        Takeovers are serialized by `flock` on `run.lock.takeover`: under it the lock is read
        again and removed only if it is still the dead run's, then created with O_EXCL. Two runs
        that both saw the dead lock cannot both take it (one would remove the other's new lock).
        """
        with open(self.path + TAKEOVER_SUFFIX, "a", encoding="utf-8") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file is closed
            current = self._holder()
            if current and current != dead:
                return False  # taken over by another run meanwhile
            if current:
                log.warning(
                    "taking over %s: its run (pid %s on %s, started %s) is no longer alive",
                    self.path,
                    dead.get("pid"),
                    dead.get("host"),
                    dead.get("start"),
                )
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
            return self._create()

    def acquire(self) -> Lock:
        """Takes the lock, or takes over a dead same-host holder's; raises WorkdirError if held."""
        if self._create():
            self.held = True
            return self
        holder = self._holder()
        same_host = holder.get("host") == self.info["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and not _pid_alive(pid):
            if self._take_over(holder):
                self.held = True
                return self
            holder = self._holder()
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('start')}"
            if holder
            else "an unknown run (unreadable lock)"
        )
        raise WorkdirError(
            f"workdir {os.path.dirname(self.path)} is in use by {who}: wait for that run to end, "
            f"use another --workdir, or delete {self.path} if that run is gone"
        )

    def release(self) -> None:
        """Removes the lock file if this run still holds it."""
        if self.held and self._holder() == self.info:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _defines_run(key: str) -> bool:
    return any(key.startswith(f) if f.endswith(".") else key == f for f in RUN_DEFINING)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{field: [old, new]} for the run-defining fields that differ (fields one side lacks are
    not compared: a newer version of the code may add fields)."""
    a, b = flatten(old), flatten(new)
    return {
        k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if _defines_run(k) and a[k] != b[k]
    }


def read_config(workdir: str) -> dict[str, Any] | None:
    """The config kept in `<workdir>/config.json`, or None when there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}): restore it or delete it") from None


def write_config(workdir: str, config: Mapping[str, Any]) -> None:
    """Keeps `config` as `<workdir>/config.json` (atomically)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dict(config), f, indent=1, sort_keys=True, default=str)

    atomic.write_file(os.path.join(workdir, CONFIG_FILE), write)


def check_resume(workdir: str, new: Mapping[str, Any], *, allow: bool) -> dict[str, list[Any]]:
    """Compares the workdir's config with `new` before a resume.

    Args:
      workdir: a workdir that holds a checkpoint.
      new: the new run's config as a nested dict.
      allow: go on despite changes (the caller records them).

    Returns:
      The run-defining changes ({} when none; `{"config.json": [None, "this run's"]}` when the
      workdir keeps no config and `allow` is True).

    Raises:
      ConfigChangeError: there are changes, or no config.json, and `allow` is False.
    """
    old = read_config(workdir)
    if old is None:
        if not allow:
            raise ConfigChangeError(
                f"{workdir} holds checkpoints but no {CONFIG_FILE}, so the run they belong to "
                "cannot be compared with this one: use another --workdir, restore its "
                f"{CONFIG_FILE}, or pass --allow_config_change to continue with this config"
            )
        return {CONFIG_FILE: [None, "this run's"]}
    changes = config_changes(old, new)
    if changes and not allow:
        listed = ", ".join(
            f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items()
        )
        raise ConfigChangeError(
            f"{workdir} holds a run with another config: {listed}; resume with the same config, "
            "use another --workdir, or pass --allow_config_change to continue with the new one"
        )
    return changes


def newest_checkpoint_meta(workdir: str) -> dict[str, Any]:
    """The run facts (`meta`) of the newest checkpoint in `<workdir>/checkpoints`, read without
    restoring it ({} when there is none or it is unreadable: the restore reports that)."""
    ckpts = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    if not steps:
        return {}
    try:
        with open(os.path.join(ckpts, str(max(steps)), "meta", "metadata"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_data(
    recorded: Mapping[str, Any] | None, current: Mapping[str, str], *, allow: bool, where: str
) -> dict[str, list[Any]]:
    """Compares the shard fingerprints a checkpoint was trained on with this run's.

    Args:
      recorded: the checkpoint's `meta[DATA_KEY]` (None: an older checkpoint, not compared).
      current: this run's {"train": fingerprint, "eval": fingerprint or ""}.
      allow: go on with other data (the caller records the change).
      where: what recorded it, for the message (e.g. "checkpoint runs/x/checkpoints/40").

    Returns:
      {"data_fingerprint.<split>": [old, new]} for each split whose data differs.

    Raises:
      ConfigChangeError: the data differ and `allow` is False.
    """
    if not isinstance(recorded, Mapping):
        return {}
    changes = {
        f"{DATA_KEY}.{split}": [recorded[split], fp]
        for split, fp in current.items()
        if split in recorded and recorded[split] != fp
    }
    if changes and not allow:
        listed = ", ".join(
            f"{k.split('.')[-1]} shards {str(a)[:12] or '(none)'} -> {str(b)[:12] or '(none)'}"
            for k, (a, b) in changes.items()
        )
        raise ConfigChangeError(
            f"{where} was trained on other data than this run's ({listed}; the shards' "
            "manifest fingerprints): point config.data at the shards it was trained on, use "
            "another --workdir, or pass --allow_config_change to continue on this data"
        )
    return changes
