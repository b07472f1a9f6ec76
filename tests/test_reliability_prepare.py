"""prepare under hostile input and a full disk: one bad row never ends it, a BOM is read, a
non-empty --out asks for --overwrite, and a failed write keeps the previous shards."""

from __future__ import annotations

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from data_helpers import pair, write_jsonl

from apo_jax.data import prepare, schema, shards

LONE_SURROGATE = b'{"prompt": "q\\ud800?", "chosen": "a", "rejected": "b"}'  # valid JSON
DEEP = b'{"prompt": "x", "chosen": ' + b"[" * 100_000 + b"]" * 100_000 + b', "rejected": "b"}'


def _cli(*args):
    try:
        return prepare.main(["apo_jax.data.prepare", *args])
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("workers", [0, 1])
def test_every_failing_row_is_a_reject_and_the_counts_add_up(tmp_path, tok_dir, workers):
    rows = [pair("What is 2 + 2?", "4.", "5."), LONE_SURROGATE, DEEP, pair("Hi?", "Hi!", "Bye.")]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    m = prepare.prepare(path, tok_dir, str(tmp_path / "out"), prepare.Settings(workers=workers))
    c = m["counts"]
    assert c["read"] == 4 and c["written"] == 2 and c["rejected"] == 2
    assert c["rejected_by_reason"] == {schema.TOO_DEEPLY_NESTED: 1, schema.UNENCODABLE_TEXT: 1}
    with open(tmp_path / "out" / shards.REJECTS, encoding="utf-8") as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, schema.UNENCODABLE_TEXT),
        (3, schema.TOO_DEEPLY_NESTED),
    ]
    assert "surrogates not allowed" in rejects[0]["detail"]
    assert [r.source_index for r in shards.read_records(str(tmp_path / "out"))] == [0, 3]


def test_a_utf8_bom_is_read_not_rejected(tmp_path, tok_dir):
    rows = [pair("What is 2 + 2?", "4.", "5."), pair("Hi?", "Hi!", "Bye.")]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    c = prepare.prepare(str(path), tok_dir, str(tmp_path / "o"))["counts"]
    assert (c["written"], c["rejected"]) == (2, 0)
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    c = prepare.prepare(str(as_json), tok_dir, str(tmp_path / "j"))["counts"]
    assert (c["written"], c["rejected"]) == (2, 0)


def test_a_non_empty_out_needs_overwrite(tmp_path, tok_dir, small_pairs, capsys):
    out = str(tmp_path / "out")
    args = [
        f"--input={small_pairs[0]}",
        f"--tokenizer={tok_dir}",
        f"--out={out}",
        "--workers=0",
        "--noprogress",
    ]
    assert _cli(*args) == 0
    capsys.readouterr()
    before = shards.read_manifest(out)["shard_fingerprint"]
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --out={out} is not empty (it holds manifest.json and 2 more): pass "
        "--overwrite to replace its shards, or choose another --out\n"
    ), err
    assert shards.read_manifest(out)["shard_fingerprint"] == before
    assert _cli(*args, "--overwrite") == 0


@pytest.fixture
def good_out(tmp_path, tok_dir, small_pairs):
    out = str(tmp_path / "out")
    prepare.prepare(small_pairs[0], tok_dir, out, prepare.Settings(records_per_shard=16))
    with open(os.path.join(out, shards.MANIFEST), "rb") as f:
        return out, f.read(), sorted(os.listdir(out))


def _keeps(good_out):
    out, manifest, names = good_out
    with open(os.path.join(out, shards.MANIFEST), "rb") as f:
        assert f.read() == manifest
    assert sorted(os.listdir(out)) == names  # no staging directory left behind
    shards.verify(out, full=True)


def test_a_full_disk_while_writing_shards_keeps_the_previous_ones(
    good_out, tok_dir, small_pairs, monkeypatch
):
    """The ArrayRecord writer really writes to /dev/full (every write: ENOSPC)."""
    out = good_out[0]
    real = shards.ShardWriter.__init__

    def to_dev_full(self, out_dir, records_per_shard=10_000):
        real(self, out_dir, records_per_shard)
        cls = self._cls
        self._cls = lambda path, options: cls("/dev/full", options)

    monkeypatch.setattr(shards.ShardWriter, "__init__", to_dev_full)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.prepare(small_pairs[0], tok_dir, out, prepare.Settings(records_per_shard=16))
    msg = str(e.value)
    assert msg.startswith(f"{out}/pairs-00000.array_record: write() failed: No space left"), msg
    assert msg.endswith(
        f"nothing was replaced in {out} (its previous shards, if any, are as they were)"
    )
    assert "\n" not in msg
    _keeps(good_out)


def test_a_full_disk_while_writing_the_manifest_keeps_the_previous_one(
    good_out, tok_dir, small_pairs, monkeypatch
):
    out = good_out[0]

    def disk_full(out_dir, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", f"{out_dir}/manifest.json.tmp")

    monkeypatch.setattr(prepare, "_write_manifest", disk_full)
    with pytest.raises(prepare.PrepareError, match=f"^{out}/manifest.json.tmp: No space left"):
        prepare.prepare(small_pairs[0], tok_dir, out, prepare.Settings(records_per_shard=16))
    _keeps(good_out)


@pytest.mark.slow  # a real process and a real SIGINT (about 5 s on 2 idle cores)
def test_ctrl_c_during_a_prepare_with_workers_is_one_line_exit_130(tmp_path, tok_dir, small_pairs):
    # 200,000 rows: still running when the signal comes, even on idle cores
    rows = small_pairs[1] * 5000
    src = write_jsonl(tmp_path / "many.jsonl", rows)
    out = tmp_path / "out"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apo_jax.data.prepare",
            f"--input={src}",
            f"--tokenizer={tok_dir}",
            f"--out={out}",
            "--workers=2",
            "--noprogress",
        ],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": repo},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    deadline = time.monotonic() + 120
    while not glob.glob(str(out / ".prepare-*" / "pairs-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before the signal: give it more rows"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "apo_jax: interrupted (Ctrl-C)\n", err
    assert os.listdir(out) == []  # the staging directory is gone, nothing was published
