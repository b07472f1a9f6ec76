"""End-to-end tests of `python -m apo_jax.train` on small demo data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from apo_jax.config import ConfigError, base_config, with_overrides
from apo_jax.data import demo
from apo_jax.train import cli as cli_lib
from apo_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("demo"))
    demo.build_demo(cache, n_train=256, n_eval=64, multi_turn=0.0)
    return cache


def small_overrides(cache, **extra):
    """--config overrides for a few steps of the demo on its small cached data."""
    o = {
        "demo.cache_dir": cache,
        "demo.n_train": 256,
        "demo.n_eval": 64,
        "batch_size": 8,
        "num_steps": 6,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 2,
        "checkpoint.every": 2,
        "checkpoint.async_save": False,
        "export_hf": False,
        "progress_bar": False,
        "samples.num_prompts": 0,  # generation and plots are tested elsewhere; they cost here
        "demo.warm_start_steps": 0,  # random weights: the warm start is test_demo's
        "plots": False,
    }
    o.update(extra)
    return o


def make_config(overrides, loss="apo_down"):
    return with_overrides(base_config(loss, None), overrides)


def losses_by_step(workdir):
    """The last logged train loss of each step (a resumed run appends to the same file)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def cli(workdir, overrides, env=None, **popen):
    args = [
        sys.executable,
        "-m",
        "apo_jax.train",
        "--config=configs/apo_down.py",
        f"--workdir={workdir}",
    ]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_same_seed_same_losses_online_reference_and_prefix_layout(demo_cache, tmp_path):
    pre = loop.train_and_evaluate(
        make_config(small_overrides(demo_cache, num_steps=3)), str(tmp_path / "a")
    )
    again = loop.train_and_evaluate(
        make_config(small_overrides(demo_cache, num_steps=3)), str(tmp_path / "b")
    )
    online = loop.train_and_evaluate(
        make_config(small_overrides(demo_cache, num_steps=3, **{"reference.mode": "online"})),
        str(tmp_path / "c"),
    )
    loop.train_and_evaluate(
        make_config(
            small_overrides(demo_cache, num_steps=3, **{"data.layout": "prefix", "data.seq_len": 0})
        ),
        str(tmp_path / "d"),
    )
    a, b, c, d = (losses_by_step(str(tmp_path / d)) for d in "abcd")
    assert sorted(a) == [1, 2, 3]
    assert a == b, "same config and seed must give bit-identical losses"
    np.testing.assert_allclose([a[s] for s in a], [c[s] for s in a], rtol=1e-5)
    # Prompt-prefix sharing (one row a pair) trains to the same losses as the demo's packed rows.
    np.testing.assert_allclose([a[s] for s in a], [d[s] for s in a], rtol=1e-4)
    assert pre["steps"] == again["steps"] == online["steps"] == 3
    # The same command on a finished workdir restores the last checkpoint and runs nothing more.
    done = loop.train_and_evaluate(
        make_config(small_overrides(demo_cache, num_steps=3)), str(tmp_path / "a")
    )
    assert done["steps"] == 3 and "train/loss" not in done
    assert "no step to run" in cli_lib.summary_text(done)
    # Precomputed log-probs were written beside the shards, in a file keyed to this reference.
    shard_dir = os.path.join(demo_cache, os.listdir(demo_cache)[0], "train_shards")
    assert [n for n in os.listdir(shard_dir) if n.startswith("reference_logps-")]


@pytest.mark.slow  # several training subprocesses
def test_killed_run_resumes_step_for_step(demo_cache, tmp_path):
    overrides = small_overrides(demo_cache, num_steps=8)
    full = cli(str(tmp_path / "full"), overrides)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    victim_dir = tmp_path / "killed"
    victim = cli(str(victim_dir), overrides)
    deadline = time.time() + 600
    while not os.path.isdir(victim_dir / "checkpoints" / "2") and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = cli(str(victim_dir), overrides)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    start = int(err.split("at step ")[1].split()[0]) if "resumed from" in err else -1
    assert 2 <= start < 8, (
        f"the resumed run must start from the kill's checkpoint, log: {err[-2000:]}"
    )
    assert losses_by_step(str(victim_dir)) == losses_by_step(str(tmp_path / "full"))


@pytest.mark.slow  # several training subprocesses
def test_sharded_fsdp_tensor_step_equals_single_device(demo_cache, tmp_path):
    overrides = small_overrides(demo_cache, num_steps=2, **{"checkpoint.every": 0})
    one = cli(
        str(tmp_path / "one"),
        overrides,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert one.wait(timeout=600) == 0, one.stderr.read()
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    eight = cli(
        str(tmp_path / "eight"),
        {**overrides, **mesh},
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert eight.wait(timeout=600) == 0, eight.stderr.read()
    a, b = losses_by_step(str(tmp_path / "one")), losses_by_step(str(tmp_path / "eight"))
    assert sorted(a) == sorted(b) == [1, 2]
    np.testing.assert_allclose([a[1], a[2]], [b[1], b[2]], rtol=2e-5)


def test_paper_preset_without_paths_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apo_jax.train",
            "--config=configs/apo_down.py:llama3_8b",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: preset llama3_8b trains a pretrained model: pass --config.model.hf_path=<Hugging Face checkpoint dir>"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 6, "grad_accum": 4}, "multiple of config.grad_accum"),
        ({"mesh.data": 3}, "does not divide"),
        ({"loss.name": "apo_up"}, "unknown loss 'apo_up'"),
        ({"data.train": "/nonexistent"}, "is not a directory"),
        ({"optim.name": "lion"}, "optim.name must be one of"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    from apo_jax import config as config_lib

    with pytest.raises(ConfigError, match=message):
        config_lib.validate(make_config(overrides), device_count=1)


def test_a_workdir_as_hf_path_points_to_its_export(tmp_path):
    from apo_jax import config as config_lib

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("{}")  # the run's config, not a model's
    with pytest.raises(
        ConfigError,
        match=r"is a training workdir; pass its Hugging Face export "
        r".*/hf \(written when that run finishes",
    ):
        config_lib.validate(make_config({"model.hf_path": str(tmp_path)}), device_count=1)


def test_precompute_reference_leaves_its_config_as_it_was(small_shards, monkeypatch):
    """The reference command runs in 'precomputed' mode on a copy: the caller's config (here
    with the default reference.mode) is not changed."""
    from apo_jax import reference
    from tests.data_helpers import small_run_config

    config = small_run_config(small_shards)
    before, locked = config.to_dict(), config.is_locked
    modes = []
    monkeypatch.setattr(reference, "prepare", lambda rc, *a, **k: modes.append(rc.reference.mode))
    loop.precompute_reference(config)
    assert modes == ["precomputed"]
    assert config.to_dict() == before and config.is_locked == locked
