"""The packed layout: every sequence once, in one row; the concat layout's log-probs, losses,
gradients and training losses; resumable loading; the row count rule."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_grads
from flax import nnx

from apo_jax import layouts, losses
from apo_jax.config import base_config, with_overrides
from apo_jax.data import demo, loader, shards
from apo_jax.layouts.packed import global_sequence_ids, pack_rows, row_count, targets
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.train import loop
from apo_jax.train import train_step as ts

CFG = get_preset(
    "tiny", vocab_size=64, n_layers=2, d_model=32, mlp_dim=64, n_heads=4, n_kv_heads=2, head_dim=8
)
# (prompt, chosen, rejected) lengths; sequences of 4 to 14 tokens, several per 24-token row.
LENGTHS = [(5, 4, 6), (3, 7, 2), (9, 1, 5), (1, 3, 3), (2, 6, 9)]


def batches(seq_len=24, with_padding_pair=True):
    """The same pairs through the loader's collate as concat and as packed batches."""
    rng = np.random.default_rng(0)
    items = []
    for i, (p, c, r) in enumerate(LENGTHS):
        rec = shards.PairRecord(*(rng.integers(1, 64, n).astype(np.int32) for n in (p, c, r)), i)
        items.append((i, shards.serialize(rec)))
    if with_padding_pair:
        items.insert(2, (-1, b""))
    n = len(items)
    ref_w, ref_l = rng.normal(size=(2, n)).astype(np.float32) - 9
    out = []
    for layout in ("concat", "packed"):
        collate = loader.Collate(layouts.get(layout), layouts.RowSpec(seq_len), ref_w, ref_l)
        out.append({k: jnp.asarray(v) for k, v in collate(items).items()})
    return out


def model_state(seed=0):
    return ts.split_model(Llama(CFG, rngs=nnx.Rngs(seed)))


def _loader(shard_dir, layout="concat", **kw):
    cfg = loader.LoaderConfig(layout=layouts.get(layout), **{"seq_len": 256, "num_epochs": 1, **kw})
    return loader.make_loader(shard_dir, cfg, process_index=0, process_count=1)


def test_pack_rows_first_fit_decreasing():
    # Longest first, each into the first row with room: 8, 7, 5 open rows; 3, 2, 1 fill them.
    assert pack_rows([5, 3, 7, 2, 8, 1], 10) == [[4, 3], [2, 1], [0, 5]]
    assert pack_rows([4, 4, 4], 4) == [[0], [1], [2]]  # ties keep sequence order


def test_row_count_rule():
    # 2N = 64: multiples of 8 up to 64; with row_multiple 3: multiples of 9, capped at 66.
    assert [row_count(u, 64) for u in (0, 1, 8, 9, 33, 64)] == [8, 8, 8, 16, 40, 64]
    assert [row_count(u, 64, 3) for u in (1, 10, 60, 64)] == [9, 18, 63, 66]
    assert row_count(3, 6, 4) == 4 and row_count(5, 6, 4) == 8


def test_packed_batches_hold_each_sequence_once_in_one_segment(small_shards):
    """Against the concat batches of the same loader: same tokens, masks and positions."""
    kw = {"batch_size": 8, "seed": 3}
    concat = list(_loader(small_shards, **kw))
    packed = list(_loader(small_shards, layout="packed", row_multiple=2, **kw))
    again = list(_loader(small_shards, layout="packed", row_multiple=2, **kw))
    assert len(packed) == len(concat) == 5
    for c, p, q in zip(concat, packed, again, strict=True):
        assert all((p[k] == q[k]).all() for k in p), "packing must be deterministic"
        n, (rows, t) = len(p["index"]), p["input_ids"].shape
        assert (p["index"] == c["index"]).all() and t == 256
        assert set(p) == set(c) | {"sequence_ids"}
        used = len({r for r in range(rows) if p["segment_ids"][r].any()})
        assert rows == row_count(used, 2 * n, 2) and rows % 2 == 0 and rows < 2 * n
        assert ((p["sequence_ids"] >= 0) == (p["segment_ids"] > 0)).all()
        for s in range(2 * n):  # sequence s is concat row s
            real = c["segment_ids"][s] > 0
            r, cols = np.nonzero(p["sequence_ids"] == s)
            assert len(set(r)) == 1, f"sequence {s} straddles rows {sorted(set(r))}"
            assert (cols == np.arange(cols[0], cols[0] + real.sum())).all()  # contiguous, all
            assert len(set(p["segment_ids"][r, cols])) == 1
            for key in ("input_ids", "completion_mask", "positions"):
                np.testing.assert_array_equal(p[key][r, cols], c[key][s][real], err_msg=key)
        for r in range(rows):  # segments numbered 1..k from the row start, padding after
            seg = p["segment_ids"][r]
            k = seg.max()
            assert list(dict.fromkeys(seg[seg > 0])) == list(range(1, k + 1))
            zeros = np.flatnonzero(seg == 0)
            assert zeros.size == 0 or not seg[zeros[0] :].any()


def test_packed_loader_resumes_mid_epoch(small_shards):
    kw = {"batch_size": 4, "num_epochs": 2, "seed": 7, "layout": "packed", "row_multiple": 2}
    ld = _loader(small_shards, **kw)
    for _ in range(13):  # past the first epoch boundary
        next(ld)
    state = ld.get_state()
    rest = list(ld)
    ld2 = _loader(small_shards, **kw)
    ld2.set_state(state)
    rest2 = list(ld2)
    assert len(rest) == len(rest2) == 7
    for a, b in zip(rest, rest2, strict=True):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_packed_targets_never_cross_a_segment_boundary():
    # One row: segment 1 = [11, 12, 13] (13 a completion token), segment 2 = [14, 15] starting
    # with a completion token, as no loader batch does; its first token must not be predicted.
    batch = {
        "input_ids": jnp.asarray([[11, 12, 13, 14, 15, 0]]),
        "completion_mask": jnp.asarray([[0, 0, 1, 1, 1, 0]]),
        "segment_ids": jnp.asarray([[1, 1, 1, 2, 2, 0]]),
        "sequence_ids": jnp.asarray([[0, 0, 0, 3, 3, -1]]),
    }
    want, mask, seq = targets(batch)
    np.testing.assert_array_equal(want, [[12, 13, 14, 15, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(seq, [[-1, 0, -1, 3, -1, -1]])


@pytest.mark.parametrize("reference", ["precomputed", "online"])
def test_pair_logps_equal_concat_layout(reference):
    concat, packed = batches()
    assert packed["input_ids"].shape[0] < concat["input_ids"].shape[0]  # it did pack
    assert int(packed["segment_ids"].max()) >= 3  # rows of 3 sequences and more
    graphdef, params = model_state()
    ref_params = model_state(seed=1)[1]
    cfg = ts.StepConfig(reference=reference, logprob_chunk=5)
    want = ts.pair_logps(graphdef, params, concat, cfg, ref_params)
    got = ts.pair_logps(
        graphdef, params, packed, dataclasses.replace(cfg, layout=layouts.get("packed")), ref_params
    )
    for name in [f for f in losses.PairLogps._fields if getattr(want, f) is not None]:
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, err_msg=name
        )
    assert float(got.chosen[2]) == 0.0 and float(got.chosen_tokens[2]) == 0.0  # padding pair
    # Not trivially equal: the pairs differ, and a token counted for the wrong sequence moves ~4.
    assert float(jnp.std(got.chosen)) > 1.0


def test_loss_and_grads_equal_concat_layout():
    concat, packed = batches()
    graphdef, params = model_state()
    cfg = ts.StepConfig(loss="apo_down")

    def loss(params, batch, layout):
        step = dataclasses.replace(cfg, layout=layouts.get(layout))
        return ts.loss_fn(params, graphdef, batch, step)[0]

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)  # compiled: eager is slower
    l1, g1 = grad(params, concat, "concat")
    l2, g2 = grad(params, packed, "packed")
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert_same_grads(g1, g2, atol=1e-6)


def test_global_sequence_ids_and_padding_to_the_agreed_shape():
    # Process 1 of 2 with 3 pairs each: its pairs are global 3..5 of 6.
    ids = np.array([[0, 0, 4, -1], [5, 2, 2, 3]], np.int32)
    np.testing.assert_array_equal(
        global_sequence_ids(ids, 3, 6, 3), [[3, 3, 10, -1], [11, 5, 5, 9]]
    )
    batch = {"sequence_ids": ids, "input_ids": ids + 1, "index": np.arange(3)}
    grown = layouts.pad_batch(batch, 4, 6)
    assert grown["input_ids"].shape == grown["sequence_ids"].shape == (4, 6)
    assert (grown["sequence_ids"][2:] == -1).all() and (grown["sequence_ids"][:, 4:] == -1).all()
    assert (grown["input_ids"][2:] == 0).all() and (grown["index"] == np.arange(3)).all()


def test_make_global_batch_single_process_keeps_packed_batch(small_shards):
    from jax.sharding import NamedSharding, PartitionSpec

    ld = _loader(small_shards, batch_size=4, layout="packed")
    b = next(ld)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    g = ld.global_batch(b, NamedSharding(mesh, PartitionSpec("data")))
    assert set(g) == set(b)
    for k in b:
        np.testing.assert_array_equal(np.asarray(g[k]), b[k], err_msg=k)


def _metrics(workdir):
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row.pop("step"), {}).update(row)
    return rows


@pytest.mark.slow  # two training runs
def test_training_packed_gives_the_concat_losses(tmp_path):
    cache = str(tmp_path / "demo")
    demo.build_demo(cache, n_train=128, n_eval=32, multi_turn=0.0)
    over = {
        "demo.cache_dir": cache,
        "demo.n_train": 128,
        "demo.n_eval": 32,
        "batch_size": 8,
        "num_steps": 3,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 2,
        "checkpoint.every": 0,
        "checkpoint.async_save": False,
        "export_hf": False,
        "progress_bar": False,
        "samples.num_prompts": 0,
        "plots": False,
        "demo.warm_start_steps": 0,
    }
    runs = {}
    for layout in ("concat", "packed"):
        config = with_overrides(base_config("apo_down", None), {**over, "data.layout": layout})
        loop.train_and_evaluate(config, str(tmp_path / layout))
        runs[layout] = _metrics(str(tmp_path / layout))
    a, b = runs["concat"], runs["packed"]
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm", "train/logps/chosen"):
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-4, err_msg=key)
        assert b[step]["train/tokens"] == a[step]["train/tokens"]  # real tokens only
    np.testing.assert_allclose(b[3]["eval/loss"], a[3]["eval/loss"], rtol=1e-4)
