"""Multi-process training on JAX's distributed runtime, over localhost CPU devices.

Two processes with 4 simulated CPU devices each (started by launch/local.sh) must train the demo
to the same losses as one process with 8, exit cleanly, and write checkpoints that a one-process
run resumes -- and vice versa. Also: the one-line errors for an unreachable coordinator, a
coordinator nobody joins, a mesh or batch that does not divide, and the launchers' dry runs.
The other row layouts on two processes: tests/test_multihost_layouts.py; shared helpers:
tests/multihost_helpers.py.

The runs share a persistent compilation cache, so the resumed runs skip most compiling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from multihost_helpers import (
    CONCAT,
    ROOT,
    _demo_data,
    _env,
    _free_port,
    _get_config,
    _losses,
    _metrics,
    _train_one,
    _train_two,
)

from apo_jax import config as config_lib
from apo_jax import distributed
from apo_jax.config import with_overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trains 3 steps on 2x4 and on 1x8 devices, then resumes each for a 4th step on the other."""
    tmp = str(tmp_path_factory.mktemp("multihost"))
    _demo_data(tmp)  # build the demo once, up front
    w2, w1 = os.path.join(tmp, "two"), os.path.join(tmp, "one")
    t0 = time.perf_counter()
    out, took = {}, {}

    def timed(name, fn, *args):
        t = time.perf_counter()
        out[name] = fn(*args)
        took[name] = round(time.perf_counter() - t)

    timed("two", _train_two, tmp, w2, 3, "--config.export_hf=True", *CONCAT)  # the references too
    timed("one", _train_one, tmp, w1, 3, "--config.export_hf=False", *CONCAT)
    first = {"two": _metrics(w2), "one": _metrics(w1)}
    # Cross-topology resume: each workdir is copied and continued for one step on the other side.
    r1, r2 = os.path.join(tmp, "two_then_one"), os.path.join(tmp, "one_then_two")
    shutil.copytree(w2, r1, ignore=shutil.ignore_patterns("logs", "hf"))
    shutil.copytree(w1, r2)
    # num_steps 3 -> 4 changes the run's schedule: a resume refuses it unless allowed.
    more = ("--config.export_hf=False", "--allow_config_change", *CONCAT)
    timed("two_then_one", _train_one, tmp, r1, 4, *more)
    timed("one_then_two", _train_two, tmp, r2, 4, *more)
    print(f"multihost runs took {time.perf_counter() - t0:.0f} s: {took}")
    return {
        "dirs": {"two": w2, "one": w1, "two_then_one": r1, "one_then_two": r2},
        "first": first,
        "out": out,
    }


@pytest.mark.slow  # four multi-process training runs
def test_two_processes_match_one_process(runs):
    two, one = _losses(runs["first"]["two"]), _losses(runs["first"]["one"])
    assert set(two) == set(one) and len(two) == 6, (two, one)
    for key in one:  # reductions run in another order across processes: round-off only
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (
            f"{key}: 2 processes x 4 devices {two[key]} != 1 process x 8 devices {one[key]}; the "
            "processes do not see the global batch the single process sees"
        )
    ev2, ev1 = runs["first"]["two"][3]["eval/loss"], runs["first"]["one"][3]["eval/loss"]
    assert ev2 == pytest.approx(ev1, rel=1e-5)


@pytest.mark.slow  # four multi-process training runs
def test_only_process_zero_writes(runs):
    w2 = runs["dirs"]["two"]
    assert os.path.exists(os.path.join(w2, "hf", "config.json"))  # export gathered the params
    log1 = open(os.path.join(w2, "logs", "process_1.log")).read()
    assert "step 3/3" not in log1 and "apo_jax: apo_down on" not in log1, log1[-1500:]
    log0 = open(os.path.join(w2, "logs", "process_0.log")).read()
    assert "step 3/3" in log0 and "process 0 of 2: 4 local of 8 devices" in log0


@pytest.mark.slow  # four multi-process training runs
def test_checkpoints_restore_across_process_counts(runs):
    a = runs["first"]
    r1 = _metrics(runs["dirs"]["two_then_one"])
    r2 = _metrics(runs["dirs"]["one_then_two"])
    assert sorted(r1) == sorted(r2) == [1, 2, 3, 4]
    for d in ("two_then_one", "one_then_two"):  # the resumed runs trained step 4 only
        with open(os.path.join(runs["dirs"][d], "metrics.jsonl")) as f:
            assert sum('"train/loss"' in line for line in f) == 4
    for rows, first in ((r1, a["two"]), (r2, a["one"])):
        assert rows[3]["train/loss"] == first[3]["train/loss"]
    assert "resumed from" in runs["out"]["two_then_one"]
    assert "resumed from" in runs["out"]["one_then_two"]
    assert r1[4]["train/loss"] == pytest.approx(r2[4]["train/loss"], rel=1e-5), (
        "step 4 after resuming a 2-process checkpoint on 1 process differs from the other way "
        "round: the state or the data position did not carry over"
    )
    assert r1[4]["train/grad_norm"] == pytest.approx(r2[4]["train/grad_norm"], rel=1e-5)


def _start_alone(tmp, pid: int, port: int, timeout: int) -> tuple[int, str, float]:
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.train",
        f"--workdir={tmp}/w{pid}",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={pid}",
        f"--config.distributed.initialization_timeout={timeout}",
    ]
    t = time.perf_counter()
    p = subprocess.run(
        cmd, cwd=ROOT, env=_env(str(tmp), 2), text=True, capture_output=True, timeout=120
    )
    return p.returncode, p.stderr, time.perf_counter() - t


@pytest.mark.slow  # waits out the runtime's connection timeouts
def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
    rc, err, seconds = _start_alone(tmp_path, 1, _free_port(), 3)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, err[-2000:]
    assert "process 1 of 2 cannot reach the coordinator at 127.0.0.1:" in errors[0]
    assert "Check failure" not in err and seconds < 60


@pytest.mark.slow  # waits out the runtime's connection timeouts
def test_coordinator_nobody_joins_times_out(tmp_path):
    rc, err, seconds = _start_alone(tmp_path, 0, _free_port(), 3)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == distributed.WATCHDOG_EXIT and len(errors) == 1, err[-2000:]
    assert "not every process joined the coordinator" in errors[0] and seconds < 60


def _config(**over):
    return with_overrides(_get_config(), over)


def test_mesh_and_batch_that_do_not_divide_name_the_fix():
    with pytest.raises(
        config_lib.ConfigError, match=r"does not divide the 8 devices of all processes"
    ):
        config_lib.validate(_config(**{"mesh.tensor": 3}), device_count=8, process_count=2)
    with pytest.raises(config_lib.ConfigError, match=r"make data\*fsdp\*tensor equal 8"):
        config_lib.validate(_config(**{"mesh.data": 2, "mesh.fsdp": 2}), device_count=8)
    with pytest.raises(config_lib.ConfigError, match="must divide across the 3 processes"):
        config_lib.validate(_config(batch_size=32), device_count=6, process_count=3)
    with pytest.raises(config_lib.ConfigError, match="process_id 2 must be < num_processes 2"):
        config_lib.validate(
            _config(**{"distributed.num_processes": 2, "distributed.process_id": 2}), device_count=8
        )


def test_plan_reads_config_env_and_clusters():
    cfg = distributed.DistributedConfig
    assert distributed.plan(cfg(), env={}) is None  # a laptop: one process
    assert distributed.plan(cfg(mode="off"), env={"JAX_NUM_PROCESSES": "4"}) is None
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    kw = distributed.plan(cfg(initialization_timeout=30), env=env)
    assert kw == {
        "coordinator_address": "10.0.0.2:8476",
        "num_processes": 4,
        "process_id": 3,
        "initialization_timeout": 30,
    }
    kw = distributed.plan(cfg(process_id=1), env=env)  # the config wins over the environment
    assert kw["process_id"] == 1
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "5",
    }
    kw = distributed.plan(cfg(), env=slurm)  # JAX's SLURM detection fills the rest
    assert kw["coordinator_address"] is None and kw["num_processes"] is None
    assert distributed.plan(cfg(), env={**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.plan(cfg(), env={"TPU_WORKER_HOSTNAMES": "w0,w1"}) is not None
    with pytest.raises(distributed.DistributedError, match="process_id"):
        distributed.plan(cfg(), env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.DistributedError, match="host:port"):
        distributed.plan(cfg(coordinator_address="nohost", num_processes=2, process_id=0), env={})


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_parse_and_shellcheck(script):
    path = os.path.join(ROOT, "launch", script)
    subprocess.run(["bash", "-n", path], check=True)
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", "-S", "warning", path], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_launch_dry_runs_print_and_refuse(tmp_path):
    def run(*args, env=None):
        return subprocess.run(
            ["bash", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=60,
        )

    p = run(
        "launch/local.sh",
        "--dry-run",
        "-n",
        "3",
        "-d",
        "2",
        "-p",
        "23456",
        "--",
        "--config.num_steps=5",
    )
    assert p.returncode == 0 and p.stdout.count("JAX_PROCESS_ID=") == 3, p.stderr
    assert (
        "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456" in p.stdout and "--config.num_steps=5" in p.stdout
    )
    assert run("launch/local.sh", "-n", "0").returncode == 2
    assert run("launch/local.sh", "--", "--config.distributed.process_id=1").returncode == 2

    p = run(
        "launch/tpu_pod.sh",
        "--dry-run",
        "--name",
        "pod1",
        "--zone",
        "us-east5-a",
        "--project",
        "proj",
        "--accelerator",
        "v5p-32",
        "--workdir",
        "gs://bucket/run1",
        "--",
        "--config.num_steps=5",
    )
    assert p.returncode == 0, p.stderr
    assert "--worker=all" in p.stdout and "gs://bucket/run1" in p.stdout
    p = run(
        "launch/tpu_pod.sh",
        "--dry-run",
        "--name",
        "pod1",
        "--zone",
        "us-east5-a",
        "--project",
        "proj",
        "--accelerator",
        "v5p-32",
        "--workdir",
        "/local/dir",
    )
    assert p.returncode == 2 and "gs://" in p.stderr

    env = {
        "SBATCH_DRY_RUN": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "WORKDIR": str(tmp_path / "w"),
    }
    p = run("launch/slurm_gpu.sbatch", "--dry-run", "--", "--config.num_steps=5", env=env)
    assert p.returncode == 0, p.stderr
    assert "srun" in p.stdout and "NCCL" in p.stdout and "--config.num_steps=5" in p.stdout
    p = run("launch/slurm_gpu.sbatch", "--dry-run", "--procs-per-node", "3", env=env)
    assert p.returncode == 2
