"""Helpers of the multi-process tests (tests/test_multihost*.py): training runs on localhost.

`train_one` runs one process with 8 simulated CPU devices, `train_two` two processes x 4 through
launch/local.sh; both share a persistent compilation cache under the test's tmp directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT = 300  # seconds per training run (about 30-70 s each on a loaded 2-core machine)
CONCAT = ("--config.data.layout=concat", "--config.data.seq_len=96")  # not the demo's packed rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(cache_dir: str, steps: int) -> list[str]:
    return [
        f"--config.num_steps={steps}",
        "--config.batch_size=8",
        "--config.demo.n_train=64",
        "--config.demo.n_eval=16",
        "--config.eval_every=0",
        "--config.eval_batches=1",
        "--config.log_every=1",
        "--config.progress_bar=False",
        f"--config.demo.cache_dir={cache_dir}",
        "--config.checkpoint.async_save=False",
        "--config.samples.num_prompts=0",  # no generation or plots: not what these runs test
        "--config.demo.warm_start_steps=0",  # random weights: the warm start is test_demo's
        "--config.plots=False",
    ]


def _env(tmp: str, devices: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _communicate(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the processes it started
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish within {timeout} s:\n{out[-3000:]}")
    return out


def _train_one(tmp: str, workdir: str, steps: int, *extra: str) -> str:
    """One process with 8 CPU devices."""
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.train",
        "--config=configs/apo_down.py",
        f"--workdir={workdir}",
        *_flags(os.path.join(tmp, "demo"), steps),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(tmp, 8),
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = _communicate(proc, RUN_TIMEOUT)
    assert proc.returncode == 0, f"one-process run failed:\n{out[-3000:]}"
    return out


def _train_two(tmp: str, workdir: str, steps: int, *extra: str) -> str:
    """Two processes x 4 CPU devices through launch/local.sh."""
    cmd = [
        "bash",
        "launch/local.sh",
        "-n",
        "2",
        "-d",
        "4",
        "-w",
        workdir,
        "-t",
        "120",
        "--python",
        sys.executable,
        "--",
        *_flags(os.path.join(tmp, "demo"), steps),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(tmp),
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = _communicate(proc, RUN_TIMEOUT)
    logs = "".join(
        open(os.path.join(workdir, "logs", f)).read()[-2000:]
        for f in sorted(os.listdir(os.path.join(workdir, "logs")))
    )
    assert proc.returncode == 0, f"two-process run failed:\n{out[-2000:]}\n{logs}"
    return out + logs


def _metrics(workdir: str) -> dict[int, dict[str, float]]:
    """step -> train metrics (and eval ones under their own keys) from metrics.jsonl."""
    rows: dict[int, dict[str, float]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows.setdefault(r.pop("step"), {}).update(r)
    return rows


def _losses(rows: dict[int, dict[str, float]], keys=("train/loss", "train/grad_norm")) -> dict:
    return {(s, k): rows[s][k] for s in sorted(rows) for k in keys if k in rows[s]}


def _get_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "apo_down", os.path.join(ROOT, "configs", "apo_down.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _demo_data(tmp: str):
    """(config, paths) of the small demo data every run here reads (`_flags`), built on first
    call so that no process builds it while another reads it."""
    from apo_jax import config as config_lib
    from apo_jax.train import data as data_lib

    c = _get_config()
    c.demo.cache_dir, c.demo.n_train, c.demo.n_eval = os.path.join(tmp, "demo"), 64, 16
    return c, data_lib.resolve_data(config_lib.validate(c, device_count=8))
