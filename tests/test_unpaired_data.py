"""Unpaired data (TRL's KTO layout): prepare, rejects and manifest, KL completions as TRL
builds them, shards, the unpaired layout and its refusals."""

import dataclasses
import json
import os

import numpy as np
import pytest

from apo_jax import layouts
from apo_jax.data import prepare, schema, shards, unpaired
from apo_jax.layouts.unpaired import UnpairedDataError
from tests.data_helpers import write_jsonl


def _rows():
    good = [
        {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5.", "label": True},
        {
            "prompt": [{"role": "user", "content": "Sort 3, 1, 2."}],
            "completion": [{"role": "assistant", "content": "1, 2, 3."}],
            "label": False,
        },
        {"prompt": "Reverse abc.", "completion": "cba", "label": True},
        {"prompt": "Count the a in banana.", "completion": "There are 2.", "label": False},
        {
            "completion": [
                {"role": "user", "content": "Is 7 > 4?"},
                {"role": "assistant", "content": "Yes, 7 > 4."},
            ],
            "label": True,
        },
    ]
    bad = [
        {"prompt": "What is 1 + 1?", "completion": "2", "label": "yes"},  # wrong_type
        {"prompt": "What is 1 + 1?", "completion": "  ", "label": True},  # empty_completion
        {"prompt": "What is 1 + 1?", "completion": "2"},  # missing_field label
    ]
    return good[:2] + bad + good[2:]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("unpaired")
    src = write_jsonl(os.path.join(root, "rows.jsonl"), _rows())
    out = os.path.join(root, "shards")
    settings = prepare.Settings(max_length=64, records_per_shard=3, kl_group=3)
    return prepare.prepare(src, tok_dir, out, settings), out


def test_manifest_counts_rejects_and_kind(prepared):
    manifest, out = prepared
    assert manifest["records"] == "unpaired" and shards.record_kind(manifest) == "unpaired"
    assert manifest["counts"]["read"] == 8 and manifest["counts"]["written"] == 5
    assert manifest["counts"]["rejected_by_reason"] == {
        schema.EMPTY_COMPLETION: 1,
        schema.MISSING_FIELD: 1,
        schema.WRONG_TYPE: 1,
    }
    with open(os.path.join(out, shards.REJECTS), encoding="utf-8") as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["line"], r["field"]) for r in rejects] == [
        (3, "label"),
        (4, "completion"),
        (5, "label"),
    ]
    assert manifest["labels"] == {"desirable": 3, "undesirable": 2}
    assert len(manifest["shards"]) == 2  # 3 + 2 records
    shards.verify(out, full=True)


def test_records_carry_labels_and_rotated_kl_completions(prepared):
    _, out = prepared
    recs = shards.read_records(out)
    assert all(isinstance(r, shards.UnpairedRecord) for r in recs)
    assert [r.label for r in recs] == [True, False, True, False, True]
    assert [r.source_index for r in recs] == [0, 1, 5, 6, 7]
    # groups of kl_group=3 written records: (0, 1, 2) and (3, 4); y' of record i is y of i - 1
    for i, j in ((0, 2), (1, 0), (2, 1), (3, 4), (4, 3)):
        np.testing.assert_array_equal(recs[i].kl_completion, recs[j].completion)
    assert recs[0].chosen is recs[0].completion and recs[0].rejected is recs[0].kl_completion


def test_kl_completion_is_cut_to_fit_its_prompt():
    long_p, short_p = np.arange(50, dtype=np.int32), np.arange(3, dtype=np.int32)
    items = [(long_p, np.ones(10, np.int32), True, 0), (short_p, np.ones(40, np.int32), False, 1)]
    first, second = unpaired.with_kl(items, kl_group=2, max_length=64)
    assert len(first.kl_completion) == 14 and len(second.kl_completion) == 10
    (alone,) = unpaired.with_kl(items[:1], kl_group=8, max_length=64)
    np.testing.assert_array_equal(alone.kl_completion, alone.completion)  # a group of one


def test_serialization_round_trip_and_pairs_untouched():
    rec = shards.UnpairedRecord(
        np.array([1, 2], np.int32),
        np.array([3], np.int32),
        np.array([4, 5, 6], np.int32),
        False,
        41,
    )
    back = shards.deserialize(shards.serialize(rec))
    assert isinstance(back, shards.UnpairedRecord) and back.label is False
    assert back.source_index == 41 and back.kl_completion.tolist() == [4, 5, 6]
    pair = shards.PairRecord(
        np.array([1], np.int32), np.array([2], np.int32), np.array([3], np.int32), 0
    )
    assert isinstance(shards.deserialize(shards.serialize(pair)), shards.PairRecord)
    with pytest.raises(shards.ShardError, match="corrupt"):
        shards.deserialize(shards.serialize(rec)[:-4])


def test_unpair_rows_orders_as_trl():
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    got = unpaired.unpair_rows(pairs, batch_size=2)
    assert [(r["completion"], r["label"]) for r in got] == [
        ("c0", True),
        ("c1", True),
        ("r0", False),
        ("r1", False),
        ("c2", True),
        ("r2", False),
    ]


def test_layout_rows_labels_and_refusals(prepared):
    _, out = prepared
    recs = shards.read_records(out)[:3] + [None]
    spec = layouts.RowSpec(seq_len=64)
    with_kl = layouts.get("unpaired").collate(recs, spec)
    assert with_kl["input_ids"].shape[0] == 8 and with_kl["label"].tolist() == [
        True,
        False,
        True,
        False,
    ]
    kl_mask = with_kl["completion_mask"][4:7].sum(1)
    assert kl_mask.tolist() == [len(r.kl_completion) for r in recs[:3]]
    no_kl = dataclasses.replace(layouts.get("unpaired"), kl=False).collate(recs, spec)
    assert no_kl["input_ids"].shape[0] == 4
    np.testing.assert_array_equal(
        no_kl["input_ids"], with_kl["input_ids"][:4, : no_kl["input_ids"].shape[1]]
    )
    pair = shards.PairRecord(
        np.array([1], np.int32), np.array([2], np.int32), np.array([3], np.int32), 0
    )
    with pytest.raises(UnpairedDataError, match="shards of pairs"):
        layouts.get("unpaired").collate([pair], spec)


def test_pairs_are_still_detected_as_pairs(small_shards):
    assert shards.record_kind(shards.read_manifest(small_shards)) == "pairs"


def test_contrastiveness_stats_refuse_unpaired_shards(prepared):
    from apo_jax.data import stats

    with pytest.raises(stats.StatsError, match="unpaired records"):
        stats.pair_stats(prepared[1])
