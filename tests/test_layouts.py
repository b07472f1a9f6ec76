"""The layout registry and checks, and packed rows with gradient accumulation.

Packed micro-batches: each micro-batch's pairs are packed apart, every micro-batch has the same
row count, and a step with ``grad_accum`` k gives the concat layout's losses and gradients with
the same k, and (no padding pairs) the packed layout's with k = 1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax import config as config_lib
from apo_jax import errors, layouts
from apo_jax.config import base_config, with_overrides
from apo_jax.data import loader, shards
from apo_jax.layouts import auto
from apo_jax.models.config import get_preset
from apo_jax.models.llama import Llama
from apo_jax.optim import OptimConfig, make_optimizer
from apo_jax.train import train_step as ts

CFG = get_preset(
    "tiny", vocab_size=64, n_layers=2, d_model=32, mlp_dim=64, n_heads=4, n_kv_heads=2, head_dim=8
)
# (prompt, chosen, rejected) lengths of 8 pairs; sequences of 3 to 15 tokens in rows of 24.
LENGTHS = [(5, 4, 6), (3, 7, 2), (9, 1, 5), (6, 8, 9), (2, 6, 9), (4, 4, 4), (7, 2, 1), (3, 9, 6)]
PACKED = layouts.get("packed")


def items(padding_pair_at=None):
    """The pairs as (record index, bytes) items; optionally one replaced by a padding pair."""
    rng = np.random.default_rng(0)
    out = []
    for i, (p, c, r) in enumerate(LENGTHS):
        rec = shards.PairRecord(*(rng.integers(1, 64, n).astype(np.int32) for n in (p, c, r)), i)
        out.append((i, shards.serialize(rec)) if i != padding_pair_at else (-1, b""))
    return out


def collate(name, its, micro_batches=1):
    rng = np.random.default_rng(1)
    ref_w, ref_l = rng.normal(size=(2, len(LENGTHS))).astype(np.float32) - 9  # by record index
    spec = layouts.RowSpec(24, pad_id=0, micro_batches=micro_batches)
    return loader.Collate(layouts.get(name), spec, ref_w, ref_l)(its)


def test_registry_gives_hashable_layout_objects():
    assert layouts.NAMES == ("concat", "prefix", "packed", "packed_prefix", "unpaired")
    for name in layouts.NAMES:
        layout = layouts.get(name)
        assert layout.name == name and layout is layouts.get(name)
        assert hash(layout) == hash(dataclasses.replace(layout))
    assert layouts.get("concat") != layouts.get("prefix")
    steps = {ts.StepConfig(layout=layouts.get(n)) for n in layouts.NAMES}  # hashable, distinct
    assert len(steps) == 5
    with pytest.raises(
        layouts.LayoutError,
        match="config.data.layout must be one of concat, "
        "prefix, packed, packed_prefix, unpaired, got 'pack'",
    ) as e:
        layouts.get("pack")
    assert isinstance(e.value, errors.UserError)
    with pytest.raises(ValueError, match="layout must be a layouts.get"):
        loader.LoaderConfig(layout="packed")


def test_checks_name_the_config_fields():
    ok = dict(batch_size=12, grad_accum=2, data_ways=4, process_count=2)
    for name in layouts.NAMES:
        with pytest.raises(layouts.LayoutError, match=r"data\*fsdp = 8 ways must divide"):
            layouts.get(name).check(**{**ok, "data_ways": 8})
    layouts.get("concat").check(**ok)  # 12 rows per micro-batch
    with pytest.raises(layouts.LayoutError, match="each micro-batch has 6 rows"):
        layouts.get("prefix").check(**ok)  # one row per pair
    PACKED.check(batch_size=8, grad_accum=2, data_ways=4, process_count=2)
    with pytest.raises(
        layouts.LayoutError,
        match=r"its 2 pairs \(config.batch_size 8 / 4 "
        r"processes\) do not split into config.grad_accum = 4",
    ) as e:
        PACKED.check(batch_size=8, grad_accum=4, data_ways=1, process_count=4)
    assert "make config.batch_size a multiple of 16" in str(e.value)
    # config_lib maps the layout's check to its ConfigError; packed accepts grad_accum now.
    c = with_overrides(base_config("apo_down", None), {"data.layout": "packed", "grad_accum": 2})
    assert config_lib.validate(c, device_count=1).grad_accum == 2
    c = with_overrides(c, {"batch_size": 8, "grad_accum": 4})
    with pytest.raises(config_lib.ConfigError, match="do not split into config.grad_accum = 4"):
        config_lib.validate(c, device_count=1, process_count=4)


def test_packed_micro_batches_are_packed_apart_with_one_row_count():
    its = items(padding_pair_at=5)
    batch = collate("packed", its, micro_batches=2)
    halves = [collate("packed", its[:4]), collate("packed", its[4:])]
    rows = max(h["input_ids"].shape[0] for h in halves)
    assert batch["input_ids"].shape == (2 * rows, 24)
    assert len({h["input_ids"].shape[0] for h in halves}) == 2  # the premise: they differ
    micro = PACKED.micro_batches(batch, 2)
    for i, half in enumerate(halves):
        want = layouts.pad_batch(half, rows, 24)  # micro-batch i alone, grown to the row count
        assert set(micro) == set(want)
        for key in want:
            np.testing.assert_array_equal(micro[key][i], want[key], err_msg=f"{i}: {key}")
    # Sequence numbers count within a micro-batch: 0..3 chosen, 4..7 rejected; pair 5 is padding.
    assert set(np.unique(micro["sequence_ids"][0]).tolist()) == set(range(-1, 8))
    assert set(np.unique(micro["sequence_ids"][1]).tolist()) == {-1, 0, 2, 3, 4, 6, 7}


def test_packed_global_batch_one_process_keeps_the_micro_batches(small_shards):
    from jax.sharding import NamedSharding, PartitionSpec

    cfg = loader.LoaderConfig(batch_size=8, seq_len=256, layout=PACKED, micro_batches=2)
    ld = loader.make_loader(small_shards, cfg, process_index=0, process_count=1)
    b = next(ld)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    g = ld.global_batch(b, NamedSharding(mesh, PartitionSpec("data")))
    assert set(g) == set(b)
    for k in b:
        np.testing.assert_array_equal(np.asarray(g[k]), b[k], err_msg=k)


def test_pad_batch_grows_each_block():
    ids = np.arange(1, 13, dtype=np.int32).reshape(4, 3)  # 2 blocks of 2 rows
    grown = layouts.pad_batch({"input_ids": ids, "index": np.arange(2)}, 3, 4, pad_id=9, blocks=2)
    want = np.full((6, 4), 9, np.int32)
    want[0:2, :3], want[3:5, :3] = ids[:2], ids[2:]
    np.testing.assert_array_equal(grown["input_ids"], want)
    np.testing.assert_array_equal(grown["index"], np.arange(2))


def _step(batch, name, grad_accum):
    """One SGD step (lr 1, so the parameter change is the gradient) on `batch`."""
    graphdef, params = ts.split_model(Llama(CFG, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(OptimConfig(name="sgd", learning_rate=1.0, schedule="constant"), 10)
    cfg = ts.StepConfig(loss="apo_down", grad_accum=grad_accum, layout=layouts.get(name))
    step = jax.jit(lambda s, b: ts.train_step(s, b, graphdef=graphdef, tx=tx, cfg=cfg))
    state, m = step(ts.init_state(params, tx, 0), {k: jnp.asarray(v) for k, v in batch.items()})
    return jax.tree.map(lambda new, old: new - old, state.params, params), m


def _assert_same_step(got, want):
    (d_got, m_got), (d_want, m_want) = got, want
    for key in ("loss", "grad_norm", "logps/chosen", "rewards/accuracies"):
        np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-5, err_msg=key)
    norms = []
    for a, b in zip(jax.tree.leaves(d_want), jax.tree.leaves(d_got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
        norms.append(float(jnp.linalg.norm(a)))
    assert max(norms) > 1e-3  # the step moved the parameters


def test_packed_grad_accum_equals_concat_and_one_micro_batch():
    its = items(padding_pair_at=6)
    concat = _step(collate("concat", its), "concat", 2)
    packed = _step(collate("packed", its, micro_batches=2), "packed", 2)
    _assert_same_step(packed, concat)
    its = items()  # all pairs real: 2 micro-batches of 4 pairs average to the batch of 8
    one = _step(collate("packed", its), "packed", 1)
    two = _step(collate("packed", its, micro_batches=2), "packed", 2)
    _assert_same_step(two, one)


def test_every_layout_gives_the_same_step():
    its = items(padding_pair_at=3)
    concat = _step(collate("concat", its), "concat", 1)
    for name in ("prefix", "packed", "packed_prefix"):
        _assert_same_step(_step(collate(name, its), name, 1), concat)


def test_packed_prefix_rows_share_prompts_and_accumulate_like_concat():
    its = items(padding_pair_at=6)
    batch = collate("packed_prefix", its)
    # 7 real pairs of 9 to 23 tokens (prompt once) in rows of 24: fewer rows than packed's.
    assert batch["input_ids"].shape[0] < collate("packed", its)["input_ids"].shape[0]
    assert np.sum(batch["segment_ids"] > 0) == sum(sum(n) for i, n in enumerate(LENGTHS) if i != 6)
    concat = _step(collate("concat", its), "concat", 2)
    _assert_same_step(
        _step(collate("packed_prefix", its, micro_batches=2), "packed_prefix", 2), concat
    )


def _manifest(prompt, chosen, rejected, max_length):
    """A manifest whose pairs all have these lengths."""
    one = lambda n: {"mean": n, "max": n, "p90": n}  # noqa: E731
    return {
        "settings": {"max_length": max_length},
        "lengths": {
            "prompt": one(prompt),
            "chosen": one(chosen),
            "rejected": one(rejected),
            "row_max": one(prompt + max(chosen, rejected)),
            "prefix_row": one(prompt + chosen + rejected),
        },
    }


RUN = dict(seq_len=None, buckets=None, batch_size=16, grad_accum=1, data_ways=1, process_count=1)


@pytest.mark.parametrize(
    "lengths,run,want",
    [
        ((384, 128, 128, 512), {}, "prefix"),  # long shared prompts fill the rows
        ((16, 200, 200, 216), {}, "concat"),  # short prompts, full rows: nothing to save
        ((20, 40, 40, 512), {"seq_len": 512}, "packed"),  # short rows padded to 512
        ((384, 128, 128, 512), {"seq_len": 512}, "concat"),  # a prefix row needs 640
        ((384, 128, 128, 512), {"batch_size": 12, "data_ways": 8}, "concat"),  # 12 rows / 8
    ],
)
def test_auto_layout_choice(lengths, run, want):
    choice = auto.choose(_manifest(*lengths), **{**RUN, **run}, model_cfg=CFG)
    assert choice.name == want, choice.reason
    assert choice.costs["concat"] == 1.0
    assert f"{want} " in choice.reason or want == "concat"


def test_auto_layout_says_why_and_what_was_ruled_out():
    choice = auto.choose(_manifest(384, 128, 128, 512), **{**RUN, "seq_len": 512})
    assert "prefix (rows of 640 > seq_len 512)" in choice.reason
    assert "mean prompt 384, chosen 128, rejected 128 tokens; rows of 512" in choice.reason
    choice = auto.choose({"settings": {"max_length": 64}}, **RUN)
    assert choice.name == "concat" and "no row lengths" in choice.reason


def test_auto_is_the_default_and_resolved_from_the_shards():
    from apo_jax.train import data as data_lib

    c = with_overrides(base_config("apo_down", None), {"data.seq_len": 0})
    rc = config_lib.validate(c, device_count=1)
    assert rc.data.layout is None  # auto, until the shards are known
    paths = data_lib.DataPaths("", "", "", _manifest(384, 128, 128, 512))
    assert data_lib.resolve_layout(rc, paths, CFG).data.layout is layouts.get("prefix")
    named = config_lib.validate(
        with_overrides(base_config("apo_down", None), {"data.layout": "concat"}), device_count=1
    )
    assert data_lib.resolve_layout(named, paths) is named
    bad = with_overrides(base_config("apo_down", None), {"data.layout": "pack"})
    with pytest.raises(config_lib.ConfigError, match="must be auto or one of concat, prefix, "):
        config_lib.validate(bad, device_count=1)


def test_layouts_other_than_concat_refuse_dpo_options():
    # regularized_logps is the contract's entry; only concat implements LD-DPO and WPO.
    for name in ("prefix", "packed", "packed_prefix"):
        with pytest.raises(
            layouts.LayoutError, match="need config.data.layout=concat, not " + name
        ):
            layouts.get(name).regularized_logps(None, None, {}, 8, ld_alpha=0.5)
        with pytest.raises(layouts.LayoutError, match="need config.data.layout=concat"):
            layouts.get(name).regularized_logps(None, None, {}, 8, wpo=True)
