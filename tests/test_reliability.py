"""Fault injection in one process: damaged checkpoints, resumes that change the experiment, two
runs in one workdir, a full disk, replaced shards, another tokenizer, keyed reference log-probs
and one-line errors. Each guarantee in docs/reliability.md names the test here that holds it."""

import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from apo_jax import errors
from apo_jax.config import base_config, with_overrides
from apo_jax.data import refs, shards
from apo_jax.metrics import MetricWriter
from apo_jax.models import safetensors_io
from apo_jax.train import cli, hooks, integrity, loop
from apo_jax.train import workdir as workdir_lib
from apo_jax.train.checkpoint import Checkpointer, SaveError, abstract_like


def _config(shard_dir, **extra):
    """A few concat-row steps of the tiny model on a copy of the conftest shards."""
    o = {
        "data.train": shard_dir,
        "data.layout": "concat",
        "data.seq_len": 0,
        "data.verify": "full",
        "samples.num_prompts": 0,
        "plots": False,
        "export_hf": False,
        "progress_bar": False,
        "batch_size": 8,
        "num_steps": 4,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint.every": 2,
        "checkpoint.async_save": False,
        "optim.warmup_steps": 0,
    }
    o.update(extra)
    loss = o.pop("loss.name", "apo_down")
    return with_overrides(base_config(loss, None), o)


def _rows_per_step(workdir):
    steps = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows if "train/loss" in r]
    return {s: steps.count(s) for s in steps}, rows


# A failed restore leaves orbax reads in flight whose exceptions Python would print, one
# TensorStore spec dump each (about 1,500 lines): the checkpointer drops them, this holds it.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_resume_falls_back_from_a_damaged_checkpoint_and_never_changes_the_run(
    tmp_path, small_shards, monkeypatch, caplog
):
    data = str(tmp_path / "shards")
    shutil.copytree(small_shards, data)
    wd = str(tmp_path / "run")
    # A read-only shard directory: the reference log-probs go to the workdir.
    monkeypatch.setattr(refs, "writable", lambda d: os.path.abspath(d) != os.path.abspath(data))
    first = loop.train_and_evaluate(_config(data), wd)
    assert first["steps"] == 4 and first["finished"]
    assert not glob.glob(os.path.join(data, "reference_logps*"))
    assert len(glob.glob(os.path.join(wd, "reference_logps", "*", "reference_logps-*.npz"))) == 1
    assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))  # released at the end

    # Truncate the newest checkpoint's largest state file: the run falls back to step 2, moves
    # step 4 aside, trains steps 3-4 again, saves step 4 again and finishes.
    state_files = [
        f for f in glob.glob(f"{wd}/checkpoints/4/state/**/*", recursive=True) if os.path.isfile(f)
    ]
    victim = max(state_files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with caplog.at_level(logging.WARNING, logger="apo_jax"):
        again = loop.train_and_evaluate(_config(data), wd)
    assert again["steps"] == 4 and again["finished"]
    warning = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warning) == 1 and len(warning[0].splitlines()) <= 2, warning
    assert "checkpoint step 4 is damaged" in warning[0] and "/checkpoints/4/state/" in warning[0]
    assert os.path.isdir(f"{wd}/checkpoints/4.damaged") and os.path.isdir(f"{wd}/checkpoints/4")
    counts, _ = _rows_per_step(wd)
    assert counts == {1: 1, 2: 1, 3: 1, 4: 1}, "metrics.jsonl must hold every step once"

    # Another run holding the workdir: refused, naming it.
    with workdir_lib.Lock(wd):
        with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {os.getpid()} on host"):
            loop.train_and_evaluate(_config(data), wd)

    # A resume that changes the loss and the schedule's length: refused in one line.
    with pytest.raises(workdir_lib.ConfigChangeError) as e:
        loop.train_and_evaluate(_config(data, **{"loss.name": "dpo", "num_steps": 5}), wd)
    assert 'loss.name "apo_down" -> "dpo"' in str(e.value) and "num_steps 4 -> 5" in str(e.value)
    assert "--allow_config_change" in str(e.value) and "\n" not in str(e.value)

    # Allowed explicitly: it goes on and metrics.jsonl records the change. Then the disk fills up
    # during the asynchronous save of step 5: step 6 stops the run with one line, step 4 is kept.
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    cfg = _config(data, num_steps=6, **{"checkpoint.every": 1, "checkpoint.async_save": True})
    with pytest.raises(SaveError) as e:
        loop.train_and_evaluate(cfg, wd, allow_config_change=True)
    msg = str(e.value)
    assert f"{wd}/checkpoints/5 failed: [Errno 28] No space left on device" in msg, msg
    assert "last good checkpoint is step 4" in msg and "\n" not in msg
    counts, rows = _rows_per_step(wd)
    assert {"step": 4, "config_change": {"num_steps": [4, 6]}} in rows
    # Reported at the step after the failed save (or at its own, when the save fails at once).
    assert max(counts) in (5, 6), counts
    steps = sorted(int(n) for n in os.listdir(f"{wd}/checkpoints") if n.isdigit())
    assert steps[-1] == 4 and not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    wd = str(tmp_path)
    with workdir_lib.Lock(wd):
        with pytest.raises(workdir_lib.WorkdirError) as e:
            workdir_lib.Lock(wd).acquire()
        assert f"pid {os.getpid()}" in str(e.value) and "since" in str(e.value)
    assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = os.path.join(wd, workdir_lib.LOCK_FILE)
    holder = {"pid": dead.pid, "host": workdir_lib.socket.gethostname(), "start": "then"}
    with open(lock_path, "w") as f:
        json.dump(holder, f)
    with caplog.at_level(logging.WARNING, logger="apo_jax"):
        lock = workdir_lib.Lock(wd).acquire()
    assert any("taking over" in r.getMessage() for r in caplog.records)
    lock.release()
    with open(lock_path, "w") as f:  # another host's lock cannot be checked: refused
        json.dump({**holder, "host": "elsewhere"}, f)
    with pytest.raises(workdir_lib.WorkdirError, match="on host elsewhere"):
        workdir_lib.Lock(wd).acquire()


def test_full_disk_during_an_async_save_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    import jax.numpy as jnp
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    def state(k):
        return {"w": jnp.arange(4.0) + k}

    ck = Checkpointer(str(tmp_path), keep=1, keep_best=0, async_save=True)
    ck.save(1, state(1), {"next": 1})
    ck.wait()

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(SaveError) as e:
        ck.save(2, state(2), {"next": 2})  # raises itself when the write fails at once
        for _ in range(1000):  # what the Checkpoint hook does after every step
            ck.poll()
            import time

            time.sleep(0.01)
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path}/2" in msg and "No space left on device" in msg
    assert "last good checkpoint is step 1" in msg
    ck.close()  # the failure is not raised twice
    monkeypatch.undo()
    restored = Checkpointer(str(tmp_path), keep=1, keep_best=0).restore(abstract_like(state(0)))
    assert restored[0] == 1 and restored[2] == {"next": 1}


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")
    with open(tmp_path / "samples.jsonl", "w") as f:
        f.write(json.dumps({"step": 2}) + "\n" + json.dumps({"step": 4}) + "\n")
    w = MetricWriter(str(tmp_path), resume_step=2)
    w.write(3, {"train/loss": 0.5})
    w.close()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert [json.loads(line)["step"] for line in open(tmp_path / "samples.jsonl")] == [2]


@pytest.fixture
def shard_copy(tmp_path, small_shards):
    out = str(tmp_path / "shards")
    shutil.copytree(small_shards, out)
    return out


@pytest.mark.parametrize("damage", ["swap", "truncate"])
def test_a_swapped_or_truncated_shard_stops_training_before_it_starts(shard_copy, tmp_path, damage):
    paths = shards.shard_paths(shard_copy)
    if damage == "swap":  # one shard replaced by a copy of another
        shutil.copy(paths[1], paths[0])
    else:
        with open(paths[0], "r+b") as f:
            f.truncate(os.path.getsize(paths[0]) - 7)
    with pytest.raises(shards.ShardError, match=os.path.basename(paths[0])):
        loop.train_and_evaluate(_config(shard_copy), str(tmp_path / "run"))


def _permuted_tokenizer(tok_dir, out):
    """A copy of the tokenizer with two token ids swapped: same size, same special ids."""
    shutil.copytree(tok_dir, out)
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(tok, f)
    return out


def test_shards_of_another_tokenizer_are_refused(small_shards, tok_dir, tmp_path):
    manifest = shards.read_manifest(small_shards)
    same = str(tmp_path / "same")
    shutil.copytree(tok_dir, same)
    with open(os.path.join(same, "config.json"), "w") as f:  # what a model directory adds
        json.dump({"vocab_size": 512, "eos_token_id": manifest["tokenizer"]["eos_token_id"]}, f)
    integrity.check_tokenizer(manifest, same, manifest)  # the same tokenizer passes
    permuted = _permuted_tokenizer(tok_dir, str(tmp_path / "permuted"))
    with pytest.raises(integrity.TokenizerMismatchError, match="other token ids"):
        integrity.check_tokenizer(manifest, permuted, None)
    with open(os.path.join(same, "config.json"), "w") as f:
        json.dump({"vocab_size": 512, "eos_token_id": 7}, f)
    with pytest.raises(integrity.TokenizerMismatchError, match="eos_token_id"):
        integrity.check_tokenizer(manifest, same, None)


def test_reference_logps_are_kept_side_by_side_per_fingerprint(shard_copy):
    n = int(shards.read_manifest(shard_copy)["counts"]["written"])
    idx = np.arange(n)
    a = {"weights": "w", "seq_len": 256}
    b = {"weights": "w", "seq_len": 96}
    refs.write_reference_logps(shard_copy, idx, -idx, -idx, a)
    refs.write_reference_logps(shard_copy, idx, idx, idx, b)
    np.testing.assert_array_equal(refs.load_reference_logps(shard_copy, a)[0], -idx)
    np.testing.assert_array_equal(refs.load_reference_logps(shard_copy, b)[0], idx)
    names = sorted(os.listdir(shard_copy))
    assert len([x for x in names if x.startswith("reference_logps-")]) == 2
    assert not [x for x in names if x.startswith(".")]  # no temporary file left
    with pytest.raises(refs.ReferenceMismatchError, match="fingerprint info"):
        refs.load_reference_logps(shard_copy, {"weights": "w", "seq_len": 128})
    from apo_jax import reference

    info = reference.fingerprint_info(shard_copy, "w", "float32", seq_len=96, chunk=128)
    assert info != reference.fingerprint_info(shard_copy, "w", "float32", seq_len=128, chunk=128)


def _one_line_exit(capsys, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    with pytest.raises(SystemExit) as e:
        cli.train_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.loss.nosuch=1"], "unknown config field 'config.loss.nosuch'"),
        (["--config=configs/nosuch.py"], "config file configs/nosuch.py does not exist"),
        (["--config=configs/apo_down.py:nosuch"], "unknown preset 'nosuch'"),
    ],
)
def test_config_mistakes_are_one_line(capsys, monkeypatch, args, message):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["apo_jax.train", *args, "--workdir=/nonexistent/never"]
    assert message in _one_line_exit(capsys, monkeypatch, argv)


def test_unusable_workdirs_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = _one_line_exit(capsys, monkeypatch, ["apo_jax.train", f"--workdir={a_file}"])
    assert f"workdir {a_file} is a file" in line
    real_open = open

    def read_only(path, *a, **k):  # tests run as root, which chmod cannot stop
        if ".write-test-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(workdir_lib.WorkdirError, match="is not writable .Permission denied."):
        workdir_lib.check_usable(str(tmp_path / "ro"))


def test_truncated_safetensors_names_the_file(tmp_path):
    path = str(tmp_path / "model.safetensors")
    safetensors_io.write_safetensors(path, {"w": np.ones((16, 16), np.float32)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{path}: truncated"):
        safetensors_io.SafetensorsFile(path)


def test_a_non_finite_stop_is_one_line(capsys):
    metrics = hooks.TrainMetrics(every=1, max_bad_steps=2, writer=None, say=print)
    with pytest.raises(SystemExit) as e:
        errors.guard(lambda: metrics._fetch(7, {"bad_steps": np.float32(2)}, np.array([3, 5])))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "2 consecutive steps with non-finite loss" in err[0] and "step 7" in err[0]


def test_a_third_signal_abandons_the_save_and_exits_75(monkeypatch, capsys):
    import signal

    from apo_jax.train import checkpoint

    exits, released = [], []

    def fake_exit(code):
        exits.append(code)

    monkeypatch.setattr(checkpoint.os, "_exit", fake_exit)
    stop = checkpoint.StopSignal(signals=(), on_abandon=lambda: released.append(True))
    stop._handle(signal.SIGINT, None)
    assert stop and stop.signal_name == "SIGINT" and not exits
    stop._handle(signal.SIGINT, None)  # the second waits for the save
    assert not exits and not released
    stop._handle(signal.SIGINT, None)
    assert exits == [checkpoint.EXIT_STOPPED] and released == [True]
    err = capsys.readouterr().err
    assert "stopping after this step" in err and "finishing the checkpoint save" in err
    assert "abandoning the save in flight" in err


def test_read_only_splits_keep_their_reference_logps_apart_in_the_workdir(shard_copy, tmp_path):
    """Train and eval shards that cannot be written: each split's log-probs go to a directory of
    its own in the workdir, and each split reads its own file (the file name is the same)."""
    evals = str(tmp_path / "eval_shards")
    shutil.copytree(shard_copy, evals)
    wd, info = str(tmp_path / "run"), {"weights": "w", "seq_len": 96}
    idx = np.arange(int(shards.read_manifest(shard_copy)["counts"]["written"]))
    for d, sign in ((shard_copy, -1), (evals, 1)):
        refs.write_reference_logps(
            d, idx, sign * idx, sign * idx, info, out_dir=refs.store_dir(d, wd)
        )
    np.testing.assert_array_equal(refs.load_reference_logps(shard_copy, info, wd)[0], -idx)
    np.testing.assert_array_equal(refs.load_reference_logps(evals, info, wd)[0], idx)
    with pytest.raises(refs.ReferenceMismatchError, match="no reference log-probs"):
        refs.load_reference_logps(evals, info)  # not beside the shards
