"""One run over many processes on JAX's distributed runtime (`jax.distributed.initialize`).

`initialize(cfg)` must run before anything touches a device. It decides from the config, then
the environment, whether this run spans several processes:

- explicit: `config.distributed.coordinator_address` / `num_processes` / `process_id`, or the
  environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
  (what `launch/local.sh` sets);
- SLURM: `srun` with more than one task (JAX reads `SLURM_*`; `launch/slurm_gpu.sbatch`);
- Cloud TPU: a multi-host slice (`TPU_WORKER_HOSTNAMES` or `MEGASCALE_COORDINATOR_ADDRESS`), or
  `mode=on`, which hands every unset value to JAX's cluster detection (`launch/tpu_pod.sh`).

Otherwise the run is one process and nothing is initialized. Failures are one-line
`DistributedError`s, and a coordinator nobody reaches is an error after
`initialization_timeout` seconds, not a hang (JAX itself would abort the process with a C++
stack trace; a watchdog here exits first with a readable line).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from apo_jax.errors import UserError

log = logging.getLogger("apo_jax")

MODES = ("auto", "on", "off")
ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
WATCHDOG_EXIT = 3  # exit status when the coordinator handshake times out


def _field(default, help: str):
    """A field of the config tree (`apo_jax.config.fields.field`: default and one-line help),
    written here because this module is imported before the config package."""
    return dataclasses.field(default=default, metadata={"help": help})


class DistributedError(UserError, RuntimeError):
    """A multi-process setting that cannot work; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the run: the config tree's `distributed` section (docs/scaling.md)."""

    mode: str = _field(
        "auto", "auto (join when config, environment, SLURM or a TPU pod says so) | on | off"
    )
    coordinator_address: str = _field("", "process 0's host:port; '': the environment or cluster")
    num_processes: int = _field(0, "0: JAX_NUM_PROCESSES or cluster detection")
    process_id: int = _field(-1, "-1: JAX_PROCESS_ID or cluster detection")
    initialization_timeout: int = _field(300, "seconds for every process to join, then an error")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> DistributedConfig:
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls) if m and f.name in m})


def check(cfg: DistributedConfig) -> None:
    """Raises DistributedError for settings that are wrong whatever the environment."""
    field = "config.distributed"
    if cfg.mode not in MODES:
        raise DistributedError(f"{field}.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.num_processes < 0:
        raise DistributedError(
            f"{field}.num_processes must be >= 0 (0: auto), got {cfg.num_processes}"
        )
    if cfg.process_id < -1:
        raise DistributedError(f"{field}.process_id must be >= 0 (-1: auto), got {cfg.process_id}")
    if cfg.num_processes and cfg.process_id >= cfg.num_processes:
        raise DistributedError(
            f"{field}.process_id {cfg.process_id} must be < num_processes {cfg.num_processes}"
        )
    if cfg.initialization_timeout <= 0:
        raise DistributedError(
            f"{field}.initialization_timeout must be > 0 seconds, got {cfg.initialization_timeout}"
        )
    if cfg.coordinator_address:
        _split_address(cfg.coordinator_address)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"coordinator address {address!r} must be host:port (config.distributed.coordinator_address "
            f"or {ENV_ADDRESS}), e.g. 10.0.0.2:8476"
        )
    return host.strip("[]"), int(port)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if not value:
        return None
    if not value.lstrip("-").isdigit():
        raise DistributedError(f"environment variable {name}={value!r} must be an integer")
    return int(value)


def _cluster(env: Mapping[str, str]) -> str:
    """The multi-process cluster JAX can detect from `env` ('' when none)."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env.get("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return ""


def plan(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a one-process run.

    Values the config leaves unset come from `JAX_*` variables; values still unset are left to
    JAX's cluster detection (SLURM, Cloud TPU), which fails with DistributedError when absent.
    """
    check(cfg)
    env = os.environ if env is None else env
    if cfg.mode == "off":
        return None
    address = cfg.coordinator_address or env.get(ENV_ADDRESS, "")
    count = cfg.num_processes or _env_int(env, ENV_COUNT)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int(env, ENV_ID)
    cluster = _cluster(env)
    explicit = bool(address) or (count or 0) > 1
    if cfg.mode == "auto" and not explicit and not cluster:
        return None
    if count == 1 and not cluster:
        return None
    if not cluster and cfg.mode == "auto" and None in (address or None, count, pid):
        missing = [
            n
            for n, v in (
                ("coordinator_address", address),
                ("num_processes", count),
                ("process_id", pid),
            )
            if v in (None, "")
        ]
        raise DistributedError(
            f"a multi-process run needs config.distributed.{', '.join(missing)} (or {ENV_ADDRESS}, "
            f"{ENV_COUNT}, {ENV_ID}) on every process; none of SLURM or Cloud TPU was detected"
        )
    if address:
        _split_address(address)
    if count is not None and pid is not None and not 0 <= pid < count:
        raise DistributedError(
            f"process id {pid} is not in [0, {count}): check config.distributed / {ENV_ID}"
        )
    return {
        "coordinator_address": address or None,
        "num_processes": count,
        "process_id": pid,
        "initialization_timeout": int(cfg.initialization_timeout),
    }


def wait_for_coordinator(address: str, timeout: float, *, who: str = "this process") -> None:
    """Polls a TCP connection to `address` until it opens; DistributedError after `timeout` s."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            last = e
            time.sleep(0.5)
    raise DistributedError(
        f"{who} cannot reach the coordinator at {address} within {timeout:.0f} s ({last}): start "
        f"process 0 there, fix config.distributed.coordinator_address / {ENV_ADDRESS}, or raise "
        "config.distributed.initialization_timeout"
    )


def _watchdog(seconds: float, message: str) -> threading.Timer:
    """Exits the process with `message` unless cancelled within `seconds` (JAX would abort)."""

    def fire():
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def initialize(cfg: DistributedConfig | Mapping[str, Any] | None = None) -> bool:
    """Joins the multi-process run described by `cfg` and the environment, once.

    Args:
      cfg: a DistributedConfig or the `config.distributed` mapping (None: all auto).

    Returns:
      True when this process is part of a multi-process run (now initialized), False for a
      one-process run.

    Raises:
      DistributedError: inconsistent settings or an unreachable coordinator (one line).
    """
    import jax

    if not isinstance(cfg, DistributedConfig):
        cfg = DistributedConfig.from_mapping(cfg)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs = plan(cfg)
    if kwargs is None:
        return False
    timeout = kwargs["initialization_timeout"]
    address, count, pid = (
        kwargs["coordinator_address"],
        kwargs["num_processes"],
        kwargs["process_id"],
    )
    who = f"process {pid} of {count}" if pid is not None else "this process"
    start = time.monotonic()
    if address and pid not in (None, 0):
        wait_for_coordinator(address, timeout, who=who)
    remaining = max(timeout - (time.monotonic() - start), 1.0)
    kwargs["initialization_timeout"] = int(remaining) + 10  # the watchdog speaks first
    log.info(
        "%s joining the run at %s (timeout %d s)", who, address or "<cluster-detected>", timeout
    )
    dog = _watchdog(
        remaining,
        f"{who}: not every process joined the coordinator at {address or '<cluster-detected>'} within "
        f"{timeout} s: start all {count or 'N'} processes with the same config.distributed "
        "(coordinator_address, num_processes) or raise config.distributed.initialization_timeout",
    )
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise DistributedError(f"jax.distributed.initialize failed for {who}: {e}") from None
    finally:
        dog.cancel()
    log.info(
        "process %d of %d: %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
