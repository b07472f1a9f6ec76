"""The smaller cases: Ctrl-C and OS errors in a command are one line, a seq_len shorter than the
rows names the right flags, a damaged checkpoint file is named, a stop says which step it stops
after and stops there, and the same shards at another path are no config change."""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import signal
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import small_run_config

from apo_jax import errors
from apo_jax.data import prepare
from apo_jax.train import cli, hooks, loop
from apo_jax.train.checkpoint import Checkpointer, abstract_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit(fn):
    with pytest.raises(SystemExit) as e:
        fn()
    return e.value.code


def test_ctrl_c_and_os_errors_in_a_command_are_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare", interrupted)
    argv = ["apo_jax.data.prepare", "--input=x.jsonl", "--tokenizer=t", f"--out={tmp_path}/o"]
    assert _exit(lambda: prepare.main(argv)) == 130
    assert capsys.readouterr().err == "apo_jax: interrupted (Ctrl-C)\n"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x")

    assert _exit(lambda: errors.guard(full)) == 2
    assert capsys.readouterr().err == (
        "error: /data/out/x: No space left on device (APO_JAX_DEBUG=1 shows the traceback)\n"
    )
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        errors.guard(interrupted)


def ctrl_c_reaches_the_child() -> None:
    """A child's Ctrl-C as in a terminal: a test run started in the background (``cmd &`` without
    job control, as CI may be) inherits SIGINT ignored, and Python then never raises it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_SWALLOWED_CTRL_C = """
import os, signal, sys
from apo_jax import errors

class Finalized:
    def __del__(self):  # the Ctrl-C lands in a finalizer, where Python swallows the exception
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass

def body():
    Finalized()
    print("went on")

errors.guard(body)
"""


def test_a_ctrl_c_swallowed_by_a_finalizer_still_ends_the_command_with_130():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", _SWALLOWED_CTRL_C],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
        preexec_fn=ctrl_c_reaches_the_child,
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "apo_jax: interrupted (Ctrl-C)\n"  # no "Exception ignored in ..."


def test_a_guarded_command_leaves_the_ctrl_c_handler_as_it_found_it():
    # Python's own handler, as in a terminal (a job started in the background inherits SIGINT
    # ignored, and then guard rightly leaves it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        hook = sys.unraisablehook
        seen = []
        errors.guard(lambda: seen.append(signal.getsignal(signal.SIGINT)))
        assert seen and seen[0] is not signal.default_int_handler  # recorded while the body ran
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert sys.unraisablehook is hook
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        errors.guard(lambda: seen.append(signal.getsignal(signal.SIGINT)))
        assert seen[1] is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_seq_len_shorter_than_the_rows_is_one_line_naming_max_length(
    tmp_path, small_shards, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    data = str(tmp_path / "shards")
    shutil.copytree(small_shards, data)
    argv = [
        "apo_jax.train",
        "--config=configs/apo_down.py",
        f"--workdir={tmp_path}/run",
        f"--config.data.train={data}",
        "--config.data.layout=concat",
        "--config.data.seq_len=16",
        "--config.samples.num_prompts=0",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    assert _exit(lambda: cli.train_main(argv)) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    # (In-process, a logging handler of an earlier test may print "--- Logging error ---" for
    # its closed stream; what matters is that the loader's error shows no traceback.)
    assert err.strip().endswith(line) and "data/loader.py" not in err, err
    assert line.startswith(f"error: {data} has concat rows of ") and "> seq_len 16: pass " in line
    assert "--config.data.seq_len=" in line and "a smaller --max_length" in line


def _state(k):
    return {"w": jnp.arange(4000.0) + k, "count": jnp.asarray(k, jnp.int32)}


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_damaged_checkpoint_file_is_named(tmp_path, caplog, damage):
    ck = Checkpointer(str(tmp_path), keep=3, keep_best=0, async_save=False)
    for step in (1, 2):
        ck.save(step, _state(step), {"next_batch": step})
    ck.close()
    files = [f for f in glob.glob(f"{tmp_path}/2/state/**/*", recursive=True) if os.path.isfile(f)]
    victim = max(files, key=os.path.getsize)  # the data file of "w"
    if damage == "delete":
        os.remove(victim)
    else:  # one bit in the middle: orbax itself restores this silently
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    with caplog.at_level(logging.WARNING, logger="apo_jax.train.checkpoint"):
        step, state, _, _ = Checkpointer(str(tmp_path)).restore(abstract_like(_state(0)))
    assert step == 1
    np.testing.assert_array_equal(state["w"], np.arange(4000.0) + 1)
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    want = "is missing" if damage == "delete" else "its sha256 differs from when it was saved"
    assert f"checkpoint step 2 is damaged ({victim}" in warning and want in warning, warning


def _config(shard_dir, **extra):
    return small_run_config(shard_dir, **extra)


@pytest.mark.slow  # two short runs (about 8 s on 2 idle cores)
def test_a_stop_names_its_step_and_the_same_shards_elsewhere_are_no_change(
    tmp_path, small_shards, capsys, monkeypatch
):
    data = str(tmp_path / "shards")
    shutil.copytree(small_shards, data)
    wd = str(tmp_path / "run")
    real = hooks.TrainMetrics.after_step

    def ctrl_c_at_step_2(self, info):  # after the loop's stop check: the stop is the next step
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, info)

    monkeypatch.setattr(hooks.TrainMetrics, "after_step", ctrl_c_at_step_2)
    stopped = loop.train_and_evaluate(_config(data), wd)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "apo_jax: SIGINT: stopping after step 3 with a checkpoint" in err, err
    assert stopped["steps"] == 3 and not stopped["finished"]

    # The same shards moved to another path (as the demo's own path passed explicitly): the
    # data is compared by content, so this is no config change.
    moved = str(tmp_path / "elsewhere")
    shutil.move(data, moved)
    again = loop.train_and_evaluate(_config(moved), wd)
    assert again["steps"] == 4 and again["finished"]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert not [r for r in map(json.loads, f) if "config_change" in r]
