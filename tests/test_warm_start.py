"""The demo's warm start: built once by the trainer, cached, renamed into place atomically."""

import os

import pytest

from apo_jax.train import warm_start


def _fake_train(calls, on_train=None):
    def train(config, workdir):
        calls.append(config)
        hf = os.path.join(workdir, "hf")
        os.makedirs(hf)
        with open(os.path.join(hf, "config.json"), "w") as f:
            f.write("{}")
        if on_train is not None:
            on_train()
        return {"finished": True, "hf_export": hf, "steps": config.num_steps}

    return train


def test_built_once_with_the_sft_loss_on_the_given_shards(tmp_path):
    calls = []
    kw = {"steps": 7, "preset": "tiny", "seed": 0, "train": _fake_train(calls)}
    hf = warm_start.build(str(tmp_path), "/data/train_shards", **kw)
    assert hf == os.path.join(warm_start.directory(str(tmp_path), 7, "tiny", 0), "hf")
    assert os.path.exists(os.path.join(hf, "config.json"))
    (config,) = calls
    assert config.loss.name == "sft" and config.data.train == "/data/train_shards"
    assert config.num_steps == 7 and config.demo.warm_start_steps == 0  # no warm start of its own
    assert warm_start.build(str(tmp_path), "/data/train_shards", **kw) == hf and len(calls) == 1
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(os.path.dirname(hf))]  # no temp left


def test_a_concurrent_build_that_wins_the_rename_is_kept(tmp_path):
    root = warm_start.directory(str(tmp_path), 3, "tiny", 0)

    def other_run_finishes_first():
        os.makedirs(os.path.join(root, "hf"))
        with open(os.path.join(root, "hf", "config.json"), "w") as f:
            f.write('{"winner": true}')

    train = _fake_train([], other_run_finishes_first)
    hf = warm_start.build(str(tmp_path), "s", steps=3, preset="tiny", seed=0, train=train)
    assert open(os.path.join(hf, "config.json")).read() == '{"winner": true}'
    assert os.listdir(tmp_path) == [os.path.basename(root)]


def test_an_interrupted_build_caches_nothing(tmp_path):
    def stopped(config, workdir):
        return {"finished": False, "hf_export": "", "steps": 2}

    with pytest.raises(warm_start.Interrupted, match="stopped at step 2 of 5"):
        warm_start.build(str(tmp_path), "s", steps=5, preset="tiny", seed=0, train=stopped)
    assert os.listdir(tmp_path) == []
