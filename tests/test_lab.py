"""The lab (`python -m apo_jax.lab`): its world, rule-based roles, statistics, caching, and one
end-to-end smoke run at toy sizes that is then resumed without redoing any step."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from apo_jax.clair import builders, ledger
from apo_jax.clair.cache import Usage
from apo_jax.lab import __main__ as lab_main
from apo_jax.lab import analysis, backends, steps, world


def test_every_style_is_read_by_the_checker_and_wrong_values_fail():
    for q in world.questions(40, 7):
        sol = world.solve(q)
        for style in world.STYLES:
            assert world.correct(q, world.render(sol, style)), (style, q)
            wrong = world.render(sol, style, world.wrong_value(sol, random.Random(q)))
            assert not world.correct(q, wrong), (style, q, wrong)


def test_questions_are_distinct_and_respect_exclusions():
    held = world.questions(50, 1)
    train = world.questions(200, 2, exclude=set(held))
    assert len(set(held)) == 50 and len(set(train)) == 200 and not set(held) & set(train)
    assert world.questions(50, 1) == held  # seeded


class _Fixed:
    """A target that answers every prompt with a given function of the question."""

    def __init__(self, answer):
        self.model, self.usage, self.answer = "fake-target", Usage(), answer

    def complete(self, messages_list, params):
        return [self.answer(m[-1]["content"], params.get("seed", 0)) for m in messages_list]


def _rows(n: int) -> list[ledger.PromptRow]:
    return [ledger.PromptRow(i + 1, {}, q) for i, q in enumerate(world.questions(n, 3))]


def test_reviser_fixes_only_wrong_answers_through_the_clair_builder():
    def taught_answer(q, _):  # right for even-length questions, one value off otherwise
        sol = world.solve(q)
        return world.render(
            sol, "taught", None if len(q) % 2 else world.wrong_value(sol, random.Random(q))
        )

    rows = _rows(30)
    result = builders.build_clair(
        rows,
        builders.Role(_Fixed(taught_answer)),
        builders.Role(backends.Reviser()),
        ledger.BuildResult(),
    )
    wrong = [r for r in rows if not world.correct(r.prompt, taught_answer(r.prompt, 0))]
    assert sorted(result.pairs) == [r.line for r in wrong]
    assert {r["reason"] for r in result.rejects.values()} == {ledger.UNCHANGED_REVISION}
    for pair in result.pairs.values():
        chosen, rejected = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        assert world.correct(pair["prompt"], chosen) and not world.correct(pair["prompt"], rejected)
        # Minimal: the revision keeps the answer's wording, only the value changes.
        strip = lambda t: "".join(c for c in t if not c.isalnum())  # noqa: E731
        assert strip(chosen) == strip(rejected)


def test_checker_judge_prefers_the_right_sample_and_has_no_preference_on_ties():
    def sample(q, seed):  # seed 0 wrong, seed 1 right for arithmetic; both wrong otherwise
        sol = world.solve(q)
        ok = seed == 1 and sol.kind == "arith"
        return world.render(
            sol, "taught", None if ok else world.wrong_value(sol, random.Random(f"{q}{seed}"))
        )

    rows = _rows(60)
    result = builders.build_onpolicy_judge(
        rows,
        builders.Role(_Fixed(sample), {"seed": 0}),
        builders.Role(backends.CheckerJudge()),
        ledger.BuildResult(),
        seed=0,
    )
    arith = [p for p in result.pairs.values() if world.solve(p["prompt"]).kind == "arith"]
    assert arith and all(world.correct(p["prompt"], p["chosen"][-1]["content"]) for p in arith)
    ties = [p for p in result.pairs.values() if world.solve(p["prompt"]).kind != "arith"]
    first_wins = [p["chosen"][-1]["content"] == sample(p["prompt"], 0) for p in ties]
    assert 0.25 < np.mean(first_wins) < 0.75  # the shown order decides a tie: a coin flip


def test_interval_covers_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    small, large = rng.random((3, 50)) < 0.5, rng.random((3, 800)) < 0.5
    ci_s, ci_l = analysis.interval(small.astype(float)), analysis.interval(large.astype(float))
    assert ci_s[0] < small.mean() < ci_s[1] and ci_l[0] < large.mean() < ci_l[1]
    assert ci_l[1] - ci_l[0] < (ci_s[1] - ci_s[0]) / 2


def test_claims_verdicts_follow_the_intervals():
    p = 400
    base = np.zeros((1, p))
    good, bad = np.ones((2, p)), np.zeros((2, p))
    mats = {("clair", "apo_zero"): good, ("stronger_preferred", "apo_zero"): bad}
    assert analysis.claim_contrastive(mats)["verdict"] == "reproduced"
    mats = {("clair", "apo_zero"): bad, ("stronger_preferred", "apo_zero"): good}
    assert analysis.claim_contrastive(mats)["verdict"] == "not reproduced"
    mats = {("clair", "apo_zero"): good, ("clair", "dpo"): good}
    assert analysis.claim_anchored(mats, {"clair": "apo_zero"})["verdict"] == "inconclusive"
    assert analysis.summary(good, base)["moved"] and not analysis.summary(base, base)["moved"]
    assert (
        analysis.expected_apo(0.9, 0.4) == "apo_zero"
        and analysis.expected_apo(0.3, 0.4) == "apo_down"
    )


def test_steps_run_once_per_key_and_redo_on_a_new_key(tmp_path):
    calls = []

    def fn(d):
        calls.append(d)
        return {"n": len(calls)}

    d = str(tmp_path / "s")
    assert steps.run_step(d, {"a": 1}, fn)[0]["n"] == 1
    assert steps.run_step(d, {"a": 1}, fn) == (steps.done_result(d, {"a": 1}), False)
    assert steps.run_step(d, {"a": 2}, fn)[0]["n"] == 2 and len(calls) == 2


def test_flags_name_the_problem():
    fv = lab_main._flag_values()
    fv(["lab", "--out=x", "--sources=clair,nope"])
    with pytest.raises(lab_main.LabError, match="--sources: nope"):
        lab_main.settings(fv)
    fv = lab_main._flag_values()
    fv(["lab", "--out=x", "--sources=stronger_preferred", "--rounds=2"])
    with pytest.raises(lab_main.LabError, match="add clair to --sources"):
        lab_main.settings(fv)


@pytest.mark.slow  # the whole lab pipeline, twice
def test_smoke_end_to_end_then_resume(tmp_path, capsys):
    out = str(tmp_path / "lab")
    argv = [
        "lab",
        f"--out={out}",
        "--noprogress",
        "--n_sft=48",
        "--sft_steps=2",
        "--pair_prompts=16",
        "--pairs=4",
        "--heldout=8",
        "--steps=1",
        "--batch_size=4",
        "--seeds=1",
        "--sources=clair",
        "--objectives=apo_zero",
    ]
    assert lab_main.run(argv) == 0
    r = json.load(open(os.path.join(out, "results.json")))
    assert [(c["dataset"], c["objective"], c["seed"]) for c in r["conditions"]] == [
        ("clair", "apo_zero", 0)
    ]
    for entry in (r["baseline"], *r["conditions"]):
        rows = [json.loads(line) for line in open(os.path.join(out, entry["generations"]))]
        assert len(rows) == 8 and set(rows[0]) == {"id", "prompt", "response", "correct"}
        assert entry["accuracy"] == pytest.approx(np.mean([row["correct"] for row in rows]))
    assert set(r["contrastiveness"]) == {"clair"} and r["pairs_per_source"] == 4
    assert r["claims"]["contrastive"]["verdict"] == "inconclusive"  # one source: nothing to compare
    report = open(os.path.join(out, "report.md")).read()
    for text in ("| CLAIR |", "(i) Contrastive", "(ii) The prescribed", "figures/logps.png"):
        assert text in report
    assert os.path.exists(os.path.join(out, "figures", "contrastiveness.png"))
    assert lab_main.run(argv) == 0  # resumed: every step is cached
    assert json.load(open(os.path.join(out, "results.json")))["steps_run"] == 0
    assert "claim (i) inconclusive" in capsys.readouterr().out
    # --rounds=2: round 1 is the grid's CLAIR cell (cached); round 2 trains that cell's model.
    assert lab_main.run([*argv, "--rounds=2"]) == 0
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["steps_run"] == 2 and [e["round"] for e in r["rounds"]] == [1, 2]
    r1, r2 = r["rounds"]
    assert r1["objective"] == r2["objective"] == "apo_zero"  # chosen right 1.0 > the target's
    assert r1["generations"] == r["conditions"][0]["generations"]
    assert r1["target_accuracy"] == pytest.approx(r["baseline"]["accuracy"])
    assert r2["target_accuracy"] == pytest.approx(r1["accuracy"])
    rows = [json.loads(line) for line in open(os.path.join(out, r2["generations"]))]
    assert r2["accuracy"] == pytest.approx(np.mean([row["correct"] for row in rows]))
    assert r2["delta"] == pytest.approx(r2["accuracy"] - r1["accuracy"])
    assert r2["delta_ci95"][0] <= r2["delta"] <= r2["delta_ci95"][1]
    # The round-2 reference pass ran on round 1's weights, not the target's.
    cfg = json.load(open(os.path.join(out, "rounds", "r2", "cell", "run", "config.json")))
    assert cfg["model"]["hf_path"] == os.path.join(out, "cells", "clair-apo_zero-s0", "run", "hf")
    assert os.path.exists(os.path.join(out, "rounds", "r2", "pairs", "requests.cache.jsonl"))
    assert "## CLAIR rounds" in open(os.path.join(out, "report.md")).read()
    assert "round 2:" in capsys.readouterr().out
    # A grid without round 1's objective: its cell is taken from the cache under the grid's name.
    assert lab_main.run([*argv[:-1], "--objectives=dpo", "--rounds=2"]) == 0
    again = json.load(open(os.path.join(out, "results.json")))
    assert again["steps_run"] == 1 and [c["objective"] for c in again["conditions"]] == ["dpo"]
    assert again["rounds"] == r["rounds"]
