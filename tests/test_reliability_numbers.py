"""Non-finite numbers and full disks: NaN hyper-parameters are refused, an update that makes the
parameters NaN is a bad step, non-finite weights are never exported, and a full disk during the
Hugging Face export or a metrics row keeps the previous file and is one line naming the file."""

from __future__ import annotations

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from apo_jax import atomic, metrics
from apo_jax import config as config_lib
from apo_jax.config import base_config, with_overrides
from apo_jax.models import hf
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.train import train_step as ts

CFG = get_preset(
    "tiny", vocab_size=64, n_layers=1, d_model=16, mlp_dim=32, n_heads=2, n_kv_heads=1, head_dim=8
)


@pytest.mark.parametrize(
    "field, value",
    [
        ("optim.learning_rate", float("nan")),
        ("loss.beta", float("inf")),
        ("optim.b2", float("-inf")),
    ],
)
def test_non_finite_hyper_parameters_are_refused_at_config_time(field, value):
    c = with_overrides(base_config("apo_down", None), {field: value})
    with pytest.raises(config_lib.ConfigError, match=f"^config.{field} must be a finite number"):
        config_lib.validate(c, device_count=1)


def test_a_negative_checkpoint_interval_is_refused():
    c = with_overrides(base_config("apo_down", None), {"checkpoint.every": -1})
    with pytest.raises(config_lib.ConfigError, match="config.checkpoint: every must be >= 0"):
        config_lib.validate(c, device_count=1)


def _batch(n=2, t=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(2 * n, t)).astype(np.int32)
    pos = np.arange(t)[None, :]
    return {
        "input_ids": jnp.asarray(ids),
        "completion_mask": jnp.asarray(np.broadcast_to(pos >= 4, (2 * n, t)).astype(np.int32)),
        "positions": jnp.asarray(np.broadcast_to(pos, (2 * n, t)).astype(np.int32)),
        "segment_ids": jnp.ones((2 * n, t), jnp.int32),
        "index": jnp.arange(n, dtype=jnp.int32),
        "ref_chosen_logps": jnp.full((n,), -30.0),
        "ref_rejected_logps": jnp.full((n,), -30.0),
    }


@pytest.mark.slow  # one jit of the train step (about 5 s on 2 idle cores)
def test_an_update_that_makes_the_parameters_non_finite_is_a_bad_step():
    """A NaN step size: the loss and gradients are finite, the updated parameters are not."""
    graphdef, params = ts.split_model(Llama(CFG, rngs=nnx.Rngs(0)))
    tx = optax.sgd(float("nan"))
    state = ts.init_state(params, tx, 0)
    before = jax.tree.map(np.asarray, state.params)
    state, m = jax.jit(
        lambda s, b: ts.train_step(s, b, None, graphdef=graphdef, tx=tx, cfg=ts.StepConfig())
    )(state, _batch())
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert int(m["skipped"]) == 1 and int(state.bad_steps) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def exported(tmp_path):
    """A good export in tmp/hf; returns (model, its dir, {file: bytes})."""
    model = Llama(CFG, rngs=nnx.Rngs(0))
    out = str(tmp_path / "hf")
    hf.save_hf(model, CFG, out)
    files = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), "rb") as f:
            files[name] = f.read()
    return model, out, files


def _unchanged(out, files):
    assert sorted(os.listdir(out)) == sorted(files)  # no temporary file left behind
    for name, data in files.items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == data, name


def test_non_finite_weights_are_never_exported(exported):
    model, out, files = exported
    kernel = model.layers.mlp.down_proj.kernel  # (L, F, D): one NaN in layer 0
    kernel.set_value(kernel.get_value().at[0, 0, 0].set(jnp.nan))
    with pytest.raises(hf.CheckpointError) as e:
        hf.save_hf(model, CFG, out)
    msg = str(e.value)
    assert msg.startswith(f"{out}: refusing to export non-finite weights (") and "1 of " in msg
    assert "\n" not in msg
    _unchanged(out, files)


def test_a_full_disk_during_the_hf_export_keeps_the_previous_export(exported, monkeypatch):
    model, out, files = exported
    real = hf.write_safetensors

    def half_then_full(path, tensors, metadata=None):
        real(path, tensors, metadata)
        with open(path, "r+b") as f:  # what a full disk leaves: the first part of the file
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "write_safetensors", half_then_full)
    with pytest.raises(atomic.WriteError) as e:
        hf.save_hf(Llama(CFG, rngs=nnx.Rngs(1)), CFG, out)
    assert str(e.value) == (
        f"{out}/model.safetensors: cannot write it (No space left on device); nothing in {out} "
        "was replaced (the previous model.safetensors, if any, is kept)"
    )
    _unchanged(out, files)


def test_a_full_disk_while_logging_a_metrics_row_keeps_the_earlier_rows(tmp_path, monkeypatch):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(1, {"train/loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    good = path.read_bytes()
    real = os.write

    def half_then_full(fd, data):
        if fd != writer._jsonl:
            return real(fd, data)
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(atomic.WriteError) as e:
        writer.write(2, {"train/loss": 0.25})
    monkeypatch.undo()
    assert str(e.value).startswith(
        f"{path}: cannot write the row of step 2 (No space left on device); the rows before it "
        "are kept"
    )
    assert path.read_bytes() == good and json.loads(good) == {"step": 1, "train/loss": 0.5}
    writer.close()
