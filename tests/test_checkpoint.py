"""Tests of the orbax checkpointer: keep policies, restore, corrupted-checkpoint fallback."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax.train.checkpoint import Checkpointer, RestoreError, abstract_like


def _state(k):
    return {
        "w": jnp.arange(4.0) + k,
        "opt": {"mu": jnp.ones((2, 3)) * k, "count": jnp.asarray(k, jnp.int32)},
    }


def test_keeps_latest_and_best(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2, keep_best=1, best_metric="eval/loss", best_mode="min")
    for step, metric in [(1, 0.5), (2, None), (3, 0.9), (4, None), (5, None)]:
        ck.save(
            step,
            _state(step),
            {"next_batch": step},
            {"step": step},
            None if metric is None else {"eval/loss": metric},
        )
    ck.wait()
    assert ck.steps() == [1, 4, 5]  # latest two, plus step 1 with the lowest held-out loss
    step, state, data, meta = ck.restore(abstract_like(_state(0)))
    assert step == 5 and data == {"next_batch": 5} and meta == {"step": 5}
    np.testing.assert_array_equal(state["w"], np.arange(4.0) + 5)
    assert int(state["opt"]["count"]) == 5
    ck.close()


def test_corrupted_latest_falls_back_with_a_warning(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), keep=3, keep_best=0)
    for step in (1, 2):
        ck.save(step, _state(step), {"next_batch": step})
    ck.close()
    for f in glob.glob(os.path.join(str(tmp_path), "2", "state", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"not a checkpoint")
    ck = Checkpointer(str(tmp_path), keep=3, keep_best=0)
    with caplog.at_level(logging.WARNING, logger="apo_jax.train.checkpoint"):
        step, state, data, _ = ck.restore(abstract_like(_state(0)))
    assert step == 1 and data == {"next_batch": 1}
    np.testing.assert_array_equal(state["w"], np.arange(4.0) + 1)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 2 is damaged" in warning and "2.damaged" in warning
    assert len(warning.splitlines()) <= 2
    assert ck.steps() == [1] and os.path.isdir(os.path.join(str(tmp_path), "2.damaged"))


def test_half_written_checkpoint_is_never_listed(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=3, keep_best=0)
    ck.save(1, _state(1), {})
    ck.wait()
    # What an interrupted save leaves behind: orbax's temporary directory, never renamed.
    os.makedirs(os.path.join(str(tmp_path), "2.orbax-checkpoint-tmp-123", "state"))
    assert ck.steps() == [1]
    ck.close()
    assert (
        Checkpointer(str(tmp_path), keep=3, keep_best=0).restore(abstract_like(_state(0)))[0] == 1
    )


def test_nothing_restorable_is_an_error(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=3, keep_best=0)
    assert ck.restore(abstract_like(_state(0))) is None
    ck.save(1, _state(1), {})
    ck.close()
    wrong = {"w": jax.ShapeDtypeStruct((7,), jnp.float32)}
    with pytest.raises(RestoreError, match="no checkpoint"):
        Checkpointer(str(tmp_path), keep=3, keep_best=0).restore(wrong)
