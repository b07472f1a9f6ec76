"""Multi-process training in the other row layouts: packed rows (with gradient accumulation) and
bucketed concat and prefix rows on two processes x 4 devices give the losses of concat rows on one
process x 8 devices. Apart from tests/test_multihost.py so that the two files run on two workers.
"""

from __future__ import annotations

import os

import pytest
from multihost_helpers import CONCAT, _demo_data, _losses, _metrics, _train_one, _train_two


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo's data and 3 concat steps on one process x 8 devices: the losses to match."""
    tmp = str(tmp_path_factory.mktemp("multihost_layouts"))
    _demo_data(tmp)  # build the demo once, up front
    w1 = os.path.join(tmp, "one")
    _train_one(tmp, w1, 3, "--config.export_hf=False", *CONCAT)
    return {"dirs": {"one": w1}, "tmp": tmp, "first": {"one": _metrics(w1)}}


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.slow  # multi-process training runs
def test_two_processes_packed_match_one_process_concat(runs, grad_accum):
    """Packed rows: each process packs its own pairs, the sequence numbers refer to the global
    pairs, the row counts and lengths are agreed; the losses are the concat layout's. With rows of
    128 and a 64 bucket, step 2 packs to 8 x 64 on process 0 and 4 x 128 on process 1, so both
    grow to 8 x 128. With grad_accum 2, each process packs its two micro-batches apart and global
    micro-batch i is the union of the processes' micro-batches i (mesh data 4 x tensor 2, so the 4
    pairs of a global micro-batch split over the batch axes)."""
    tmp = runs["tmp"]
    w = os.path.join(tmp, f"two_packed_accum{grad_accum}")
    accum = (
        ()
        if grad_accum == 1
        else ("--config.grad_accum=2", "--config.mesh.data=4", "--config.mesh.tensor=2")
    )
    _train_two(
        tmp,
        w,
        3,
        "--config.export_hf=False",
        "--config.data.layout=packed",
        "--config.data.seq_len=128",
        "--config.data.buckets=(64,)",
        *accum,
    )
    packed, one = _losses(_metrics(w)), _losses(runs["first"]["one"])
    assert set(packed) == set(one) and len(one) == 6, (packed, one)
    for key in one:
        assert packed[key] == pytest.approx(one[key], rel=1e-4), (
            f"{key}: packed (grad_accum {grad_accum}) on 2 processes {packed[key]} != concat on 1 "
            f"process {one[key]}"
        )


@pytest.mark.parametrize("layout, bucket", [("concat", 64), ("prefix", 96)])
@pytest.mark.slow  # multi-process training runs
def test_two_processes_with_buckets_match_one_process_concat(runs, layout, bucket):
    """Buckets: each process pads its own pairs to the smallest bucket that fits, so at step 2
    and in the eval batch process 0 has rows of the bucket and process 1 of 128; both grow to 128
    before the global batch is built, and the losses are the single process's."""
    from apo_jax import layouts
    from apo_jax.data import loader

    tmp = runs["tmp"]
    c, paths = _demo_data(tmp)  # built by `runs`
    lengths = []  # the premise: the processes' row lengths differ for one step
    for split, epochs, steps in ((paths.train, None, 3), (paths.eval, 1, 1)):
        for p in range(2):
            cfg = loader.LoaderConfig(
                batch_size=4,
                seq_len=128,
                buckets=(bucket,),
                layout=layouts.get(layout),
                seed=c.seed,
                shuffle=epochs is None,
                num_epochs=epochs,
            )
            ld = loader.make_loader(split, cfg, process_index=p, process_count=2)
            lengths.append([next(ld)["input_ids"].shape[1] for _ in range(steps)])
    assert lengths == [[bucket, bucket, bucket], [bucket, 128, bucket], [bucket], [128]], lengths
    w = os.path.join(tmp, f"two_{layout}_buckets")
    _train_two(
        tmp,
        w,
        3,
        "--config.export_hf=False",
        f"--config.data.layout={layout}",
        "--config.data.seq_len=128",
        f"--config.data.buckets=({bucket},)",
    )
    rows = _metrics(w)
    got, one = _losses(rows), _losses(runs["first"]["one"])
    assert set(got) == set(one) and len(one) == 6, (got, one)
    for key in one:
        assert got[key] == pytest.approx(one[key], rel=1e-4), (
            f"{key}: {layout} with buckets on 2 processes {got[key]} != concat on 1 process "
            f"{one[key]}; the padding to the agreed length changed the losses"
        )
    assert rows[3]["eval/loss"] == pytest.approx(runs["first"]["one"][3]["eval/loss"], rel=1e-4)
