"""prepare: every bad row rejected with the right reason, every good row written, counts add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from data_helpers import pair, small_pairs, tok_dir, write_jsonl  # noqa: F401  (fixtures)

from apo_jax.data import ingest, prepare, schema, shards

USER = {"role": "user", "content": "What is 2 + 2?"}


def _conv(answer, role="assistant"):
    return [USER, {"role": role, "content": answer}]


# (row, expected reason or None for a good row, expected field)
CASES = [
    (pair("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."), None, None),  # CLAIR layout
    ({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Bye!"}, None, None),  # TRL standard
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": "4."}],
      "rejected": [{"role": "assistant", "content": "5."}]}, None, None),  # TRL conversational
    ({"chosen": [USER, {"role": "assistant", "content": "4."}, {"role": "user", "content": "Sure?"},
                 {"role": "assistant", "content": "Yes, 4."}],
      "rejected": [USER, {"role": "assistant", "content": "4."}, {"role": "user", "content": "Sure?"},
                   {"role": "assistant", "content": "No, 5."}]}, None, None),  # implicit prompt, multi-turn
    (b'{"prompt": "x", "chosen": ', schema.MALFORMED_JSON, "<line>"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', schema.NON_UTF8, "<line>"),
    ({"prompt": "x", "rejected": "b"}, schema.MISSING_FIELD, "chosen"),
    ({"prompt": "x", "chosen": 7, "rejected": "b"}, schema.WRONG_TYPE, "chosen"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, schema.WRONG_TYPE, "prompt"),
    ({"prompt": "x", "chosen": "   \n", "rejected": "b"}, schema.EMPTY_COMPLETION, "chosen"),
    ({"prompt": "x", "chosen": _conv("a"), "rejected": _conv("")}, schema.EMPTY_COMPLETION, "rejected"),
    ({"prompt": "x", "chosen": "same", "rejected": "same "}, schema.IDENTICAL_COMPLETIONS, "rejected"),
    ({"prompt": "x", "chosen": _conv("a", role="robot"), "rejected": _conv("b")}, schema.BAD_ROLE, "chosen[1].role"),
    ({"prompt": "x", "chosen": [USER, {"content": "a"}], "rejected": _conv("b")}, schema.MISSING_FIELD,
     "chosen[1].role"),
    ({"prompt": "x", "chosen": _conv("a", role="user"), "rejected": _conv("b")}, schema.BAD_ROLE, "chosen[1].role"),
    ({"prompt": "x", "chosen": _conv("a"), "rejected": [{"role": "user", "content": "other"},
                                                      {"role": "assistant", "content": "b"}]},
     schema.PROMPT_MISMATCH, "rejected"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, schema.EMPTY_PROMPT, "prompt"),
    ([1, 2, 3], schema.NOT_AN_OBJECT, "<row>"),
    ({"prompt": "word " * 300, "chosen": "a", "rejected": "b"}, schema.PAIR_TOO_LONG, "prompt"),
    ({"prompt": "x", "chosen": "long " * 300, "rejected": "b"}, schema.COMPLETION_TOO_LONG, "chosen"),
]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok_dir):  # noqa: F811
    d = tmp_path_factory.mktemp("bad")
    path = write_jsonl(d / "mixed.jsonl", [row for row, _, _ in CASES])
    manifest = prepare.prepare(path, tok_dir, str(d / "out"), prepare.Settings(max_length=128))
    return d / "out", manifest


def test_every_bad_row_rejected_with_reason(prepared):
    out, manifest = prepared
    rejects = [json.loads(line) for line in open(out / shards.REJECTS)]
    got = {r["line"]: (r["reason"], r["field"]) for r in rejects}
    want = {i + 1: (reason, field) for i, (_, reason, field) in enumerate(CASES) if reason}
    assert got == want
    assert all(r["file"].endswith("mixed.jsonl") for r in rejects)


def test_every_good_row_written_and_counts_add_up(prepared):
    out, manifest = prepared
    good = [i for i, (_, reason, _) in enumerate(CASES) if reason is None]
    assert [r.source_index for r in shards.read_records(str(out))] == good
    c = manifest["counts"]
    assert c["read"] == len(CASES) == c["written"] + c["rejected"]
    assert sum(c["rejected_by_reason"].values()) == c["rejected"]
    assert (
        manifest["tokenizer"]["fingerprint"]
        and "<|eot_id|>" in manifest["tokenizer"]["chat_template"]
    )
    assert manifest["lengths"]["prompt"]["count"] == len(good)
    assert 0 < manifest["contrastiveness"]["jaccard_tokens"]["mean"] < 1


def test_strict_makes_a_reject_fatal(tmp_path, tok_dir):  # noqa: F811
    path = write_jsonl(tmp_path / "x.jsonl", [CASES[0][0], CASES[6][0]])
    with pytest.raises(prepare.PrepareError, match="x.jsonl:2: chosen: missing_field"):
        prepare.prepare(path, tok_dir, str(tmp_path / "o"), prepare.Settings(strict=True))


def test_field_mapping_json_and_parquet(tmp_path, tok_dir):  # noqa: F811
    rows = [
        {"question": f"Q{i}?", "good": f"A{i}.", "bad": f"B{i}.", "sys": "Be brief."}
        for i in range(3)
    ]
    with open(tmp_path / "rows.json", "w") as f:
        json.dump(rows, f)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    fields = schema.FieldMap(prompt="question", chosen="good", rejected="bad", system="sys")
    m = prepare.prepare([str(tmp_path / "rows.json"), str(tmp_path / "rows.parquet")], tok_dir,
                        str(tmp_path / "o"), prepare.Settings(fields=fields))  # fmt: skip
    assert m["counts"] == {"read": 6, "written": 6, "rejected": 0, "rejected_by_reason": {}}
    assert [r.source_index for r in shards.read_records(str(tmp_path / "o"))] == list(range(6))


def test_output_independent_of_worker_count(tmp_path, tok_dir, small_pairs):  # noqa: F811
    fps = []
    for workers in (0, 2):
        s = prepare.Settings(max_length=256, records_per_shard=16, workers=workers, chunk_size=7)
        fps.append(
            prepare.prepare(small_pairs[0], tok_dir, str(tmp_path / f"w{workers}"), s)[
                "shard_fingerprint"
            ]
        )
    assert fps[0] == fps[1]


def test_unreadable_inputs_raise_input_error(tmp_path, tok_dir):  # noqa: F811
    with pytest.raises(ingest.InputError, match="no such file"):
        prepare.prepare(str(tmp_path / "missing.jsonl"), tok_dir, str(tmp_path / "o"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ingest.InputError, match="Parquet"):
        prepare.prepare(str(tmp_path / "bad.parquet"), tok_dir, str(tmp_path / "o"))


@pytest.mark.parametrize("what", ["tokenizer", "input"])
def test_cli_one_line_error_exit_2(tmp_path, tok_dir, small_pairs, what):  # noqa: F811
    args = [
        "--input",
        small_pairs[0],
        "--tokenizer",
        tok_dir,
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    args[args.index(tok_dir if what == "tokenizer" else small_pairs[0])] = str(tmp_path / "nope")
    proc = subprocess.run([sys.executable, "-m", "apo_jax.data.prepare", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().count("\n") == 0
        and "nope" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_save_to_disk_dataset_dict_split(tmp_path, tok_dir, small_pairs):  # noqa: F811
    import datasets

    ds = datasets.Dataset.from_list(small_pairs[1][:6])
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dsd")
    )
    m = prepare.prepare(
        str(tmp_path / "dsd"), tok_dir, str(tmp_path / "o"), prepare.Settings(split="test")
    )
    assert m["counts"]["written"] == 2
    with pytest.raises(ingest.InputError, match="no split 'dev'"):
        prepare.prepare(
            str(tmp_path / "dsd"), tok_dir, str(tmp_path / "o"), prepare.Settings(split="dev")
        )


def test_prompt_list_with_full_conversations_is_not_doubled():
    conv = [{"role": "user", "content": "Q?"}]
    row = {"prompt": conv, "chosen": conv + [{"role": "assistant", "content": "A."}],
           "rejected": conv + [{"role": "assistant", "content": "B."}]}  # fmt: skip
    p = schema.to_pair(row, schema.FieldMap(), source_index=0, file="f", line=1)
    assert list(p.prompt) == conv and (p.chosen, p.rejected) == ("A.", "B.")


def test_tokenizer_problems_are_one_fatal_error_not_rejects(
    tmp_path,
    tok_dir,  # noqa: F811
    small_pairs,  # noqa: F811
    monkeypatch,
):
    import shutil

    from apo_jax.data import tokenize

    bare = tmp_path / "bare_tokenizer"
    shutil.copytree(tok_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(tokenize.TokenizerError, match="has no chat template"):
        prepare.prepare(small_pairs[0], str(bare), str(tmp_path / "out"))
    # A package the template needs is missing (as jinja2 is on a machine without torch).
    real = tokenize.load_tokenizer

    def without_jinja(path):
        tok = real(path)

        def fail(*a, **k):
            raise ImportError("apply_chat_template requires jinja2 to be installed")

        tok.apply_chat_template = fail
        return tok

    monkeypatch.setattr(tokenize, "load_tokenizer", without_jinja)
    with pytest.raises(
        tokenize.TokenizerError, match="cannot render its chat template: ImportError"
    ):
        prepare.prepare(small_pairs[0], tok_dir, str(tmp_path / "out2"))
    assert not (tmp_path / "out2" / "rejects.jsonl").exists()  # no row was blamed for it
