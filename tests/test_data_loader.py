"""Loader: exact round trip, deterministic per-epoch shuffles, process slices, resume, layouts, refs."""

from __future__ import annotations

import numpy as np
import pytest

from apo_jax import layouts
from apo_jax.data import ingest, loader, prepare, refs, schema, tokenize
from apo_jax.layouts import prefix

N_RECORDS = 40


def _loader(shard_dir, layout="concat", **kw):
    proc = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
    proc.setdefault("process_index", 0)
    proc.setdefault("process_count", 1)
    cfg = loader.LoaderConfig(layout=layouts.get(layout), **{"seq_len": 256, **kw})
    return loader.make_loader(shard_dir, cfg, **proc)


def _indices(ld):
    return [b["index"].tolist() for b in ld]


def test_round_trip_exact_token_ids(small_shards, small_pairs, tok_dir):
    tok = tokenize.load_tokenizer(tok_dir)
    seen = 0
    for b in _loader(small_shards, batch_size=4, num_epochs=1, shuffle=False):
        n = len(b["index"])
        assert b["input_ids"].shape == (2 * n, 256) and b["input_ids"].dtype == np.int32
        assert b["index"].dtype == np.int64
        for i, idx in enumerate(b["index"]):
            raw = ingest.RawRow(int(idx), "f", 1, small_pairs[1][idx])
            p = ingest.parse_row(raw, schema.FieldMap())
            want_p, want_c, want_r = tokenize.split_pair(tok, list(p.prompt), p.chosen, p.rejected)
            for row, want_comp in ((i, want_c), (n + i, want_r)):
                length = int(b["segment_ids"][row].sum())
                assert b["input_ids"][row, :length].tolist() == want_p + want_comp
                comp = b["completion_mask"][row]
                assert (
                    comp[: len(want_p)].sum() == 0
                    and comp[len(want_p) : length].all()
                    and not comp[length:].any()
                )
                assert b["positions"][row, :length].tolist() == list(range(length))
            seen += 1
    assert seen == N_RECORDS


def test_shuffles(small_shards):
    a = sum(_indices(_loader(small_shards, batch_size=5, num_epochs=2, seed=1)), [])
    b = sum(_indices(_loader(small_shards, batch_size=5, num_epochs=2, seed=1)), [])
    c = sum(_indices(_loader(small_shards, batch_size=5, num_epochs=2, seed=2)), [])
    assert a == b and a != c
    e0, e1 = a[:N_RECORDS], a[N_RECORDS:]
    assert sorted(e0) == sorted(e1) == list(range(N_RECORDS))  # each epoch is a permutation
    assert e0 != e1 and e0 != list(range(N_RECORDS))


@pytest.mark.parametrize("procs", [2, 4])
def test_processes_disjoint_complete_and_equal_to_one_process(small_shards, procs):
    n = 5 if procs == 2 else 2  # global batch 10 / 8 divides 40
    per = [
        _indices(
            _loader(
                small_shards,
                batch_size=n,
                num_epochs=1,
                seed=3,
                process_index=p,
                process_count=procs,
            )
        )
        for p in range(procs)
    ]
    flat = [sorted(sum(batches, [])) for batches in per]
    allidx = sum(flat, [])
    assert sorted(allidx) == list(range(N_RECORDS)) and len(set(allidx)) == N_RECORDS
    single = _indices(_loader(small_shards, batch_size=n * procs, num_epochs=1, seed=3))
    for step, global_batch in enumerate(single):
        assert sorted(sum((per[p][step] for p in range(procs)), [])) == sorted(global_batch)


def test_drop_remainder_counted_and_padding(small_shards):
    ld = _loader(small_shards, batch_size=3, num_epochs=1, process_count=2, process_index=1)
    assert ld.num_batches == 6 and ld.dropped == 4 and len(list(ld)) == 6
    ld = _loader(small_shards, batch_size=3, num_epochs=1, drop_remainder=False, shuffle=False)
    batches = list(ld)
    assert ld.padded == 2 and len(batches) == 14
    last = batches[-1]
    assert last["index"].tolist() == [39, -1, -1]
    assert (
        not last["segment_ids"][[1, 2, 4, 5]].any()
        and not last["completion_mask"][[1, 2, 4, 5]].any()
    )


def test_resume_mid_epoch_gives_same_remaining_batches(small_shards):
    ld = _loader(small_shards, batch_size=4, num_epochs=2, seed=7)
    for _ in range(13):  # past the first epoch boundary
        next(ld)
    state = ld.get_state()
    rest = [b["input_ids"] for b in ld]
    ld2 = _loader(small_shards, batch_size=4, num_epochs=2, seed=7)
    ld2.set_state(state)
    rest2 = [b["input_ids"] for b in ld2]
    assert len(rest) == 7 and all((x == y).all() for x, y in zip(rest, rest2, strict=True))


def test_grain_workers_same_batches_and_portable_state(small_shards):
    a = _indices(_loader(small_shards, batch_size=4, num_epochs=1, seed=5))
    ld = _loader(small_shards, batch_size=4, num_epochs=1, seed=5, worker_count=1)
    first = [next(ld)["index"].tolist() for _ in range(3)]
    state = ld.get_state()
    rest = _indices(ld)
    assert first + rest == a
    resumed = _loader(small_shards, batch_size=4, num_epochs=1, seed=5)  # no workers now
    resumed.set_state(state)
    assert _indices(resumed) == rest


def test_seq_len_too_short_is_refused_up_front(small_shards):
    with pytest.raises(ValueError, match="re-prepare"):
        _loader(small_shards, batch_size=2, seq_len=16)


def test_state_from_another_loader_is_refused(small_shards):
    state = _loader(small_shards, batch_size=4, seed=1).get_state()
    with pytest.raises(ValueError, match="seed"):
        _loader(small_shards, batch_size=4, seed=2).set_state(state)


def test_buckets_pick_smallest_fitting_length(small_shards):
    for b in _loader(small_shards, batch_size=4, num_epochs=1, buckets=(64, 128)):
        t = b["input_ids"].shape[1]
        longest = int(b["segment_ids"].sum(1).max())
        assert (
            t in (64, 128, 256) and longest <= t and (t == 64 or longest > {128: 64, 256: 128}[t])
        )


def test_prefix_layout_and_mask(small_shards):
    concat = next(_loader(small_shards, batch_size=2, num_epochs=1, shuffle=False))
    b = next(
        _loader(
            small_shards, batch_size=2, num_epochs=1, shuffle=False, layout="prefix", seq_len=320
        )
    )
    p, c = int(b["prompt_length"][0]), int(b["chosen_length"][0])
    ids, cm = concat["input_ids"], concat["completion_mask"]
    chosen = ids[0][cm[0] == 1]
    rejected = ids[2][cm[2] == 1]
    assert b["input_ids"][0, p : p + c].tolist() == chosen.tolist()
    assert b["input_ids"][0, p + c : p + c + len(rejected)].tolist() == rejected.tolist()
    assert b["positions"][0, p + c] == p  # rejected restarts at the prompt end
    mask = prefix.attention_mask(b["branch_ids"], b["segment_ids"])[0]
    q_rej, q_ch = p + c, p + c - 1
    assert mask[q_rej, :p].all() and not mask[q_rej, p : p + c].any() and mask[q_rej, q_rej]
    assert mask[q_ch, : q_ch + 1].all() and not mask[q_ch, q_ch + 1 :].any()
    assert not mask[:p, p:].any()  # the prompt never sees completions


def test_reference_logps_round_trip_and_fingerprint_refusal(tmp_path, tok_dir, small_pairs):
    out = str(tmp_path / "s")
    prepare.prepare(small_pairs[0], tok_dir, out, prepare.Settings(max_length=256))
    idx = np.arange(N_RECORDS)[::-1]
    refs.write_reference_logps(out, idx, -idx.astype(float), -2.0 * idx, {"model": "m1"})
    for b in _loader(out, batch_size=8, num_epochs=1, reference_info={"model": "m1"}):
        np.testing.assert_array_equal(b["ref_chosen_logps"], -b["index"].astype(np.float32))
        np.testing.assert_array_equal(b["ref_rejected_logps"], -2.0 * b["index"].astype(np.float32))
    with pytest.raises(refs.ReferenceMismatchError, match="fingerprint info"):
        _loader(out, batch_size=8, reference_info={"model": "m2"})
    assert "ref_chosen_logps" not in next(_loader(out, batch_size=8))  # none asked for
    # Re-prepare other data (same pairs, other order): the shard fingerprint changes, the file is refused.
    import shutil

    from data_helpers import write_jsonl

    stored = refs.find_reference_logps(out, {"model": "m1"})
    assert stored == f"{out}/{refs.reference_file({'model': 'm1'})}"
    keep = shutil.copy(stored, tmp_path / "ref.npz")
    other = write_jsonl(tmp_path / "rev.jsonl", small_pairs[1][::-1])
    prepare.prepare(other, tok_dir, out, prepare.Settings(max_length=256))
    shutil.copy(keep, stored)
    with pytest.raises(refs.ReferenceMismatchError, match="computed for shards"):
        _loader(out, batch_size=8, reference_info={"model": "m1"})
    refs.write_reference_logps(out, [0, 1], [0.0, 0.0], [0.0, 0.0], {"model": "m1"})
    with pytest.raises(refs.ReferenceMismatchError, match="misses 38"):
        _loader(out, batch_size=8, reference_info={"model": "m1"})


def test_make_global_batch_single_process(small_shards):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    ld = _loader(small_shards, batch_size=4, num_epochs=1)
    b = next(ld)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    g = ld.global_batch(b, NamedSharding(mesh, PartitionSpec("data")))
    assert set(g) == set(b)
    for k in b:
        np.testing.assert_array_equal(np.asarray(g[k]), b[k])


# (prompt, chosen, rejected) lengths: every layout fits the 16 bucket (prefix rows up to 12).
PAD_LENGTHS = [(3, 4, 5), (2, 6, 3), (5, 2, 4)]
PAD_ID = 7


def _collated(layout, seq_len=32, buckets=(16,)):
    """Three pairs and a padding pair through the loader's collate, pad id 7, reference logps."""
    from apo_jax.data import shards

    rng = np.random.default_rng(0)
    items = [
        (
            i,
            shards.serialize(
                shards.PairRecord(*(rng.integers(8, 64, n).astype(np.int32) for n in lens), i)
            ),
        )
        for i, lens in enumerate(PAD_LENGTHS)
    ] + [(-1, b"")]
    ref_w, ref_l = rng.normal(size=(2, len(items))).astype(np.float32) - 9
    spec = layouts.RowSpec(seq_len, PAD_ID, buckets)
    return loader.Collate(layouts.get(layout), spec, ref_w, ref_l)(items)


@pytest.mark.parametrize("layout", ["concat", "prefix", "packed"])
def test_pad_batch_writes_the_padding_of_the_collate(layout):
    b = _collated(layout)
    if layout == "prefix":  # an [N, T, T] field grows on both last axes
        b["attn_mask"] = prefix.attention_mask(b["branch_ids"], b["segment_ids"])
    rows, t = b["input_ids"].shape
    assert t == 16  # the bucket, so there is room to grow to 24
    grown = layouts.pad_batch(b, rows + 2 * (layout == "packed"), 24, PAD_ID)
    assert set(grown) == set(b)
    fills = {"input_ids": PAD_ID, "sequence_ids": -1}  # everything else: 0 / False
    for key, x in b.items():
        g = grown[key]
        assert g.dtype == x.dtype, key
        if x.ndim == 1:  # per pair: index, lengths, reference logps
            np.testing.assert_array_equal(g, x, err_msg=key)
            continue
        want_shape = (rows + 2 * (layout == "packed"),) + (24,) * (x.ndim - 1)
        assert g.shape == want_shape, key
        old = tuple(slice(0, d) for d in x.shape)
        np.testing.assert_array_equal(g[old], x, err_msg=key)
        new = np.ones(g.shape, bool)
        new[old] = False
        assert (g[new] == fills.get(key, 0)).all(), f"{key}: padding {np.unique(g[new])}"
    if layout != "packed":  # exactly the batch the collate writes at that length
        b.pop("attn_mask", None)
        want = _collated(layout, seq_len=24, buckets=None)
        grown = layouts.pad_batch(b, rows, 24, PAD_ID)
        assert set(grown) == set(want)
        for key in want:
            np.testing.assert_array_equal(grown[key], want[key], err_msg=key)


@pytest.mark.parametrize("layout", ["concat", "prefix", "packed"])
def test_padding_to_a_larger_shape_keeps_logps_and_loss(layout):
    """What another process's longer bucket or extra packed rows do to this process's pairs."""
    import jax.numpy as jnp
    from flax import nnx

    from apo_jax.models.config import get_preset
    from apo_jax.models.llama import Llama
    from apo_jax.train import train_step as ts

    cfg = get_preset(
        "tiny",
        vocab_size=64,
        n_layers=2,
        d_model=32,
        mlp_dim=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
    )
    graphdef, params = ts.split_model(Llama(cfg, rngs=nnx.Rngs(0)))
    step = ts.StepConfig(loss="apo_down", layout=layouts.get(layout))
    b = _collated(layout)
    rows, _ = b["input_ids"].shape
    grown = layouts.pad_batch(b, rows + 2 * (layout == "packed"), 40, PAD_ID)
    out = []
    for batch in (b, grown):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        logps = ts.pair_logps(graphdef, params, batch, step)
        out.append((logps.chosen, logps.rejected, ts.loss_fn(params, graphdef, batch, step)[0]))
    assert np.isfinite(out[0][0][:3]).all() and float(jnp.std(out[0][0][:3])) > 0.1
    for name, a, g in zip(("chosen", "rejected", "loss"), *out, strict=True):
        np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6, err_msg=name)
