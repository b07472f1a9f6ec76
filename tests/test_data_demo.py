"""The embedded demo: CLAIR-style minimal corrections, cached, deterministic, loadable."""

from __future__ import annotations

import os

from apo_jax.data import demo, loader, shards, stats


def test_pairs_are_minimal_corrections():
    rows = demo.generate_pairs(200, seed=0)
    assert rows == demo.generate_pairs(200, seed=0)
    for r in rows:
        c, j = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        assert c != j and r["chosen"][:-1] == r["rejected"][:-1]
        assert stats.levenshtein(c, j) <= 8  # the same wording with the wrong part fixed
    assert any(len(r["chosen"]) > 2 for r in rows)  # some multi-turn with a system prompt


def test_arithmetic_answers_are_right():
    import random

    for i in range(50):
        q, good, bad = demo._arith(random.Random(i))
        a, op, b = q.removeprefix("What is ").rstrip("?").split()
        want = eval(f"{a}{op}{b}")  # noqa: S307  (our own generated digits and operator)
        assert good.endswith(f"The answer is {want}.") and not bad.endswith(
            f"The answer is {want}."
        )


def test_build_demo_cached_and_loadable(tmp_path):
    a = demo.build_demo(str(tmp_path), n_train=120, n_eval=24)
    m = shards.read_manifest(a.train_shards)
    assert m["counts"]["written"] == 120 and m["tokenizer"]["dir"] == a.tokenizer_dir
    assert shards.read_manifest(a.eval_shards)["counts"]["written"] == 24
    stamp = os.path.getmtime(a.train_shards)
    b = demo.build_demo(str(tmp_path), n_train=120, n_eval=24)
    assert b == a and os.path.getmtime(b.train_shards) == stamp  # reused, not rebuilt
    batch = next(
        loader.make_loader(
            a.train_shards, loader.LoaderConfig(batch_size=4), process_index=0, process_count=1
        )
    )
    assert batch["input_ids"].shape == (8, 256)
