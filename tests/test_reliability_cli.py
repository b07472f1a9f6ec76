"""Fault injection that needs a real process: two Ctrl-C during the interrupt save, exit status."""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from apo_jax.train.checkpoint import EXIT_STOPPED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"train/loss"' in line)


@pytest.mark.slow  # a training subprocess stopped by signals
def test_two_sigints_finish_the_save_then_exit_75(tmp_path, small_shards):
    data, wd = str(tmp_path / "shards"), str(tmp_path / "run")
    shutil.copytree(small_shards, data)
    overrides = {
        "data.train": data,
        "data.layout": "concat",
        "data.seq_len": 0,
        "samples.num_prompts": 0,
        "plots": False,
        "export_hf": False,
        "progress_bar": False,
        "reference.mode": "online",
        "batch_size": 8,
        "num_steps": 500,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint.every": 0,
        "checkpoint.async_save": True,
    }
    args = [
        sys.executable,
        "-m",
        "apo_jax.train",
        "--config=configs/apo_down.py",
        f"--workdir={wd}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    reader.start()
    deadline = time.time() + 600
    while _trained_steps(wd) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, list(lines.queue)[-30:]
    proc.send_signal(signal.SIGINT)
    err = ""
    while "stopping after step " not in err and time.time() < deadline:
        err += lines.get(timeout=600)
    announced = int(err.split("stopping after step ")[1].split()[0])
    proc.send_signal(signal.SIGINT)  # while the first one's step finishes and its save runs
    out = proc.stdout.read()
    proc.wait(timeout=600)
    reader.join(timeout=60)
    err += "".join(lines.queue)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "finishing the checkpoint save in flight" in err
    # The stop is announced once its checkpoint is committed, and that checkpoint is complete.
    line = next(ln for ln in err.splitlines() if "committed in" in ln)
    step = int(line.split("checkpoint of step ")[1].split()[0])
    assert 2 <= step < 500 and step == announced  # it stops after the step it said
    names = os.listdir(os.path.join(wd, "checkpoints"))
    assert str(step) in names and not [n for n in names if "tmp" in n], names
    assert "stopped early at step" in out
    with open(os.path.join(wd, "checkpoints", str(step), "data", "metadata")) as f:
        assert json.load(f)  # the data position was written: the checkpoint resumes
