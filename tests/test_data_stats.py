"""Contrastiveness statistics on hand-checked examples, raw pair files and prepared shards."""

from __future__ import annotations

import json
import os

import pytest
from data_helpers import pair, write_jsonl

from apo_jax.data import stats


def test_jaccard_hand_checked():
    assert stats.jaccard("the cat sat".split(), "the cat ran".split()) == pytest.approx(2 / 4)
    assert stats.jaccard("a a b".split(), "b a".split()) == 1.0  # sets, not multisets
    assert stats.jaccard([], []) == 1.0 and stats.jaccard(["x"], ["y"]) == 0.0
    assert stats.jaccard([1, 2, 3], [3, 4]) == pytest.approx(1 / 4)


def test_levenshtein_hand_checked():
    assert stats.levenshtein("kitten", "sitting") == 3
    assert stats.levenshtein("flaw", "lawn") == 2
    assert stats.levenshtein("", "abc") == 3 and stats.levenshtein("same", "same") == 0
    assert stats.levenshtein("The answer is 42.", "The answer is 43.") == 1


def test_word_tokens_and_summary():
    assert stats.word_tokens("Hi, there! 2+2=4") == [
        "Hi",
        ",",
        "there",
        "!",
        "2",
        "+",
        "2",
        "=",
        "4",
    ]
    s = stats.summarize([1, 2, 3, 4])
    assert (
        s["count"] == 4
        and s["mean"] == 2.5
        and s["median"] == 2.5
        and s["min"] == 1
        and s["max"] == 4
    )
    assert stats.summarize([])["count"] == 0


def test_pair_stats_raw_file_with_outputs(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [pair("Q?", "the cat sat", "the cat ran"), pair("Q?", "kitten", "sitting"), b"{broken"],
    )
    res = stats.pair_stats(path, out_dir=str(tmp_path / "o"))
    assert res["count"] == 2 and res["skipped"] == 1 and res["jaccard_tokens"] == "word"
    assert [r["jaccard"] for r in res["per_pair"]] == pytest.approx([0.5, 0.0])
    assert [r["levenshtein"] for r in res["per_pair"]] == [2, 3]  # sat->ran: 2 substitutions
    assert res["levenshtein"]["mean"] == 2.5
    assert os.path.getsize(tmp_path / "o" / "histograms.png") > 1000
    assert json.load(open(tmp_path / "o" / "summary.json"))["count"] == 2
    assert len(open(tmp_path / "o" / "pair_stats.jsonl").readlines()) == 2


def test_pair_stats_shards_match_raw_levenshtein(small_shards, small_pairs, tok_dir):
    shard_res = stats.pair_stats(small_shards)
    raw_res = stats.pair_stats(small_pairs[0], tokenizer_dir=tok_dir)
    assert shard_res["count"] == raw_res["count"] == 40
    assert shard_res["jaccard_tokens"] == raw_res["jaccard_tokens"] == "tokenizer"
    # Decoded answers equal the raw answers, so the character distances agree pair by pair.
    assert [r["levenshtein"] for r in shard_res["per_pair"]] == [
        r["levenshtein"] for r in raw_res["per_pair"]
    ]


def test_cli_flags_table_and_one_line_errors(tmp_path, small_pairs, capsys):
    def run(*args):
        try:
            return stats.main(["apo_jax.data.stats", *args])
        except SystemExit as e:
            return e.code

    assert run(f"--input={small_pairs[0]}", f"--out={tmp_path / 'o'}") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"40 pairs (0 unreadable skipped) from {small_pairs[0]}"
    assert out[1].startswith("jaccard      [word tokens] mean ") and len(out) == 4
    assert run(f"--input={tmp_path / 'nope.jsonl'}") == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'nope.jsonl'}: no such file or directory\n"
    )
    assert run(small_pairs[0]) == 2  # the old positional form
    assert "Flag --input must have a value" in capsys.readouterr().err
    assert run("--help") == 0
    help_flags = [
        line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  --")
    ]
    assert help_flags == ["--input=...", "--tokenizer=...", "--out=...", "--split=train"]
