"""A resume on other data, or into a workdir that kept no config, is refused unless allowed.

The checkpoint records the fingerprints of the shards it was trained on; the shards here are
re-prepared from the same rows in another order (same record count, so only the fingerprint
tells them apart)."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from data_helpers import small_run_config, write_jsonl

from apo_jax.data import prepare
from apo_jax.train import loop
from apo_jax.train import workdir as workdir_lib


def _config(shard_dir, **extra):
    return small_run_config(shard_dir, **{**{"num_steps": 2, "checkpoint.every": 1}, **extra})


def _prepare(rows, tok_dir, out):
    src = write_jsonl(f"{out}.jsonl", rows)
    prepare.prepare(src, tok_dir, out, prepare.Settings(max_length=256, records_per_shard=16))
    return out


def _config_changes(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["config_change"] for r in rows if "config_change" in r]


@pytest.mark.slow  # three short runs (about 10 s on 2 idle cores)
def test_a_resume_on_other_data_is_refused_unless_allowed(tmp_path, tok_dir, small_pairs):
    rows = small_pairs[1]
    data = _prepare(rows, tok_dir, str(tmp_path / "shards"))
    wd = str(tmp_path / "run")
    loop.train_and_evaluate(_config(data), wd)
    shutil.rmtree(os.path.join(wd, "checkpoints", "2"))  # as if stopped after step 1

    # Other rows (the same ones reversed) prepared into the same directory.
    shutil.rmtree(data)
    _prepare(rows[::-1], tok_dir, data)
    with pytest.raises(workdir_lib.ConfigChangeError) as e:
        loop.train_and_evaluate(_config(data), wd)
    msg = str(e.value)
    assert "was trained on other data than this run's (train shards " in msg, msg
    assert "--allow_config_change" in msg and "\n" not in msg
    # Refused before the reference pass: no log-probs were computed for the new shards.
    assert not glob.glob(os.path.join(data, "reference_logps*"))

    again = loop.train_and_evaluate(_config(data), wd, allow_config_change=True)
    assert again["steps"] == 2 and again["finished"]
    (change,) = _config_changes(wd)
    assert (
        list(change) == ["data_fingerprint.train"]
        and change["data_fingerprint.train"][0] != (change["data_fingerprint.train"][1])
    )
    # The new checkpoint records the new data: the same command now resumes without a word.
    assert loop.train_and_evaluate(_config(data), wd)["finished"]
    assert len(_config_changes(wd)) == 1


def test_checkpoints_without_config_json_are_refused_unless_allowed(tmp_path, small_shards):
    data = str(tmp_path / "shards")
    shutil.copytree(small_shards, data)
    first = str(tmp_path / "first")
    loop.train_and_evaluate(_config(data), first)
    wd = str(tmp_path / "copy")
    shutil.copytree(os.path.join(first, "checkpoints"), os.path.join(wd, "checkpoints"))
    shutil.rmtree(os.path.join(wd, "checkpoints", "2"))

    with pytest.raises(workdir_lib.ConfigChangeError, match="holds checkpoints but no config.json"):
        loop.train_and_evaluate(_config(data, **{"loss.beta": 0.5}), wd)
    assert loop.train_and_evaluate(_config(data), wd, allow_config_change=True)["finished"]
    assert _config_changes(wd) == [{"config.json": [None, "this run's"]}]
    assert os.path.exists(os.path.join(wd, "config.json"))
