"""`apo_jax.eval`: greedy parity with transformers, rejects, resume after a kill, the command."""

import json
import os
import subprocess
import sys

import pytest
from eval_helpers import (
    N_NEW,
    chat_reply,
    demo_prompts,
    hf_greedy,
    loopback_server,
    make_model_dir,
    write_jsonl,
)

from apo_jax.eval import generation, progress, prompts, runner
from apo_jax.eval.generation import Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_dir(str(tmp_path_factory.mktemp("eval_model")))


@pytest.fixture(scope="module")
def greedy_run(model, tmp_path_factory):
    """The in-process greedy run every parity check reads: 10 prompts, batch 4 (a padded tail)."""
    path, _, _ = model
    tmp = tmp_path_factory.mktemp("greedy")
    rows = demo_prompts(10)
    src = write_jsonl(str(tmp / "prompts.jsonl"), rows)
    s = runner.Settings(
        model=path,
        prompts=src,
        out=str(tmp / "out"),
        batch_size=4,
        sampling=Sampling(max_new_tokens=N_NEW),
        checker="apo_jax.eval.checkers:demo",
    )
    summary = runner.run(s)
    return rows, summary, _read_jsonl(tmp / "out" / "generations.jsonl"), s


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_greedy_responses_equal_transformers_generate(model, greedy_run):
    _, tok, hf_model = model
    rows, summary, gens, _ = greedy_run
    stops = generation.stop_token_ids(tok, model[0])
    assert len(stops) == 2 and tok.eos_token_id in stops
    assert [g["id"] for g in gens] == [r["id"] for r in rows]  # input order, ids kept
    for row, gen in zip(rows, gens, strict=True):
        ref = hf_greedy(hf_model, tok, row, stops)
        stopped = ref[-1] in stops
        body = ref[:-1] if stopped else ref
        assert gen["num_tokens"] == len(body), (row, gen, ref)
        assert gen["finish_reason"] == ("stop" if stopped else "length")
        assert gen["response"] == tok.decode(body, skip_special_tokens=True)
        assert gen["prompt"] == row.get("prompt", row.get("messages"))
        assert gen["correct"] is False  # a random model answers no demo question
    c = summary["counts"]
    assert c["finish_stop"] >= 1 and c["finish_length"] >= 1  # both endings were compared
    assert summary["checker"]["accuracy"] == 0.0 and summary["checker"]["count"] == 10
    assert summary["generation"]["tokens"] == sum(g["num_tokens"] for g in gens) + c["finish_stop"]


def test_bad_rows_go_to_rejects_with_reasons(model, tmp_path):
    rows = [
        {"prompt": "What is 2 + 3?"},
        "{not json",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"text": "no prompt field"},
        {"prompt": "   "},
        {"prompt": 7},
        {"id": 0, "prompt": "duplicate of row 0's id"},
        {"id": [1], "prompt": "bad id"},
        {"messages": [{"role": "user"}]},
        {"prompt": "word " * 300},
        [1, 2],
    ]
    src = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    out = tmp_path / "out"
    summary = runner.run(
        runner.Settings(
            model=model[0],
            prompts=src,
            out=str(out),
            batch_size=2,
            sampling=Sampling(max_new_tokens=N_NEW),
        )
    )
    rejects = _read_jsonl(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [
        (1, prompts.MALFORMED_JSON),
        (2, prompts.LAST_TURN_NOT_USER),
        (3, prompts.PROMPT_AND_MESSAGES),
        (4, prompts.NO_PROMPT),
        (5, prompts.EMPTY_PROMPT),
        (6, prompts.PROMPT_NOT_STRING),
        (7, prompts.DUPLICATE_ID),
        (8, prompts.BAD_ID),
        (9, prompts.BAD_MESSAGES),
        (10, prompts.PROMPT_TOO_LONG),
        (11, prompts.NOT_AN_OBJECT),
    ]
    assert rejects[6]["id"] == 0 and rejects[1]["line"] == 3
    c = summary["counts"]
    assert c["read"] == len(rows) == c["prompts"] + c["rejected"]
    assert c["rejected_by_reason"][prompts.PROMPT_TOO_LONG] == 1
    assert [g["id"] for g in _read_jsonl(out / "generations.jsonl")] == [0]


def test_export_rows_are_checked_before_generating(model, tmp_path):
    """A MixEval export of rows without problem_type stops before the first token, not after."""
    from apo_jax.eval.exports import ExportError

    src = write_jsonl(str(tmp_path / "p.jsonl"), demo_prompts(3))
    s = runner.Settings(
        model=model[0],
        prompts=src,
        out=str(tmp_path / "out"),
        batch_size=2,
        sampling=Sampling(max_new_tokens=N_NEW),
        formats=("mixeval",),
    )
    with pytest.raises(ExportError, match="row id 'q0' has no problem_type"):
        runner.run(s)
    assert not (tmp_path / "out" / "progress.jsonl").exists()


def test_killed_run_resumes_without_regenerating(model, tmp_path):
    src = write_jsonl(str(tmp_path / "p.jsonl"), demo_prompts(6))
    sampling = Sampling(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, num_samples=2, seed=3)

    def settings(out):
        return runner.Settings(
            model=model[0], prompts=src, out=str(tmp_path / out), batch_size=4, sampling=sampling
        )

    whole = runner.run(settings("whole"))

    def kill(n_done):
        raise KeyboardInterrupt  # like a kill right after the first batch was logged

    with pytest.raises(KeyboardInterrupt):
        runner.run(settings("killed"), on_batch=kill)
    log = tmp_path / "killed" / "progress.jsonl"
    assert len(_read_jsonl(log)) == 4 and not (tmp_path / "killed" / "generations.jsonl").exists()
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"index": 5, "sample": 1, "id": "q5", "resp')  # torn by the kill mid-write
    resumed = runner.run(settings("killed"))
    assert resumed["counts"]["resumed"] == 4 and resumed["counts"]["generated"] == 8
    assert resumed["corrupt_progress_lines"] == 1
    want = _read_jsonl(tmp_path / "whole" / "generations.jsonl")
    assert _read_jsonl(tmp_path / "killed" / "generations.jsonl") == want  # same samples
    assert [(g["id"], g["sample"]) for g in want[:2]] == [("q0", 0), ("q0", 1)]
    assert whole["counts"]["responses"] == 12
    again = runner.run(settings("killed"))  # nothing left to do: the model is not even loaded
    assert again["counts"]["generated"] == 0 and again["generation"]["tokens"] == 0
    with pytest.raises(progress.ResumeError, match="temperature"):
        runner.run(
            runner.Settings(
                model=model[0],
                prompts=src,
                out=str(tmp_path / "killed"),
                sampling=Sampling(max_new_tokens=N_NEW),
            )
        )


def test_sample_is_the_training_hooks_call(model, greedy_run):
    from apo_jax.eval import checkers
    from apo_jax.models.hf import load_hf

    path, tok, _ = model
    rows, _, gens, _ = greedy_run
    jax_model, _ = load_hf(path)
    stops = generation.stop_token_ids(tok, path)
    got = generation.sample(
        jax_model,
        tok,
        rows[:3],
        sampling=Sampling(max_new_tokens=N_NEW),
        batch_size=4,
        stop_tokens=stops,
        checker=checkers.demo,
    )
    assert got == gens[:3]
    with pytest.raises(ValueError, match="empty_prompt"):
        generation.sample(jax_model, tok, ["  "])


def test_bucket_lengths_bound_the_compiled_shapes():
    assert [generation.bucket_length(n) for n in (1, 16, 17, 33, 49, 65, 97, 129, 193, 257)] == [
        16,
        16,
        32,
        48,
        64,
        96,
        128,
        192,
        256,
        384,
    ]
    assert len({generation.bucket_length(n) for n in range(1, 4097)}) == 16
    assert all(generation.bucket_length(n) < 1.5 * n for n in range(33, 5000))
    plan = generation.plan_batches({(0, 0): 9, (1, 0): 3, (2, 0): 5, (3, 0): 3}, 3)
    assert plan == [[(1, 0), (3, 0), (2, 0)], [(0, 0)]]


def test_workdir_without_export_and_bad_flags_are_one_line_errors(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text('{"loss": {"name": "apo_down"}}')  # the run's
    with pytest.raises(runner.EvalError, match="without its Hugging Face export"):
        runner.resolve_model_dir(str(tmp_path / "run"))
    (tmp_path / "run" / "hf").mkdir()
    (tmp_path / "run" / "hf" / "config.json").write_text('{"model_type": "llama"}')
    assert runner.resolve_model_dir(str(tmp_path / "run")) == str(tmp_path / "run" / "hf")
    (tmp_path / "run" / "hf" / "config.json").unlink()
    with pytest.raises(generation.SamplingError, match="--num_samples=2 with greedy"):
        Sampling(num_samples=2).check()
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apo_jax.eval",
            f"--model={tmp_path / 'run'}",
            f"--prompts={tmp_path / 'p.jsonl'}",
            f"--out={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model=") and "hf" in lines[0]


@pytest.mark.slow  # a subprocess with 4 simulated devices
def test_command_sharded_over_4_devices_gives_the_same_responses(model, greedy_run, tmp_path):
    """The exact command, with prompts over 'data' and weights over 'tensor', equals 1 device."""
    rows, _, gens, s = greedy_run
    for i, row in enumerate(rows):  # MixEval rows carry problem_type (and keep every field)
        row["problem_type"] = "free-form" if i % 2 else "single-choice"
        row["dataset"] = "demo"
    src = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apo_jax.eval",
            f"--model={model[0]}",
            f"--prompts={src}",
            f"--out={out}",
            f"--max_new_tokens={N_NEW}",
            "--batch_size=4",
            "--mesh_data=2",
            "--mesh_tensor=2",
            "--format=alpaca_eval,arena_hard,mixeval",
            "--model_name=tiny",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert _read_jsonl(out / "generations.jsonl") == [
        {k: v for k, v in g.items() if k != "correct"} for g in gens
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    alpaca = json.loads((out / "alpaca_eval.json").read_text())
    assert alpaca[0] == {
        "instruction": rows[0]["prompt"],
        "output": gens[0]["response"],
        "generator": "tiny",
        "dataset": "demo",
    }
    assert alpaca[3]["instruction"] == rows[3]["messages"][-1]["content"]
    arena = _read_jsonl(out / "arena_hard" / "tiny.jsonl")
    assert arena[0]["uid"] == "q0" and arena[0]["model"] == "tiny"
    assert arena[0]["messages"][-1] == {
        "role": "assistant",
        "content": {"answer": gens[0]["response"]},
    }
    assert arena[0]["metadata"] == {"token_len": gens[0]["num_tokens"]}
    base = out / "mixeval" / "tiny" / "mixeval_hard" / "2024-06-01"
    ff = _read_jsonl(base / "tiny_close_freeform_hard.jsonl")
    mc = _read_jsonl(base / "tiny_close_multichoice_hard.jsonl")
    assert len(ff) == len(mc) == 5
    assert ff[0] == {**rows[1], "response": gens[1]["response"]}
    assert summary["exports"]["mixeval"] == [
        str(base / "tiny_close_freeform_hard.jsonl"),
        str(base / "tiny_close_multichoice_hard.jsonl"),
    ]


def test_rerun_with_a_judge_scores_without_regenerating(greedy_run, tmp_path):
    """The judge block of summary.json, through the command's runner (a judge that always says A)."""
    import dataclasses

    from apo_jax.eval import judge

    rows, _, gens, s = greedy_run
    baseline = write_jsonl(
        str(tmp_path / "base.jsonl"), [{**g, "response": g["response"] + "!"} for g in gens[:8]]
    )
    with loopback_server(lambda body: chat_reply("[[A]]")) as url:
        js = judge.JudgeSettings(baseline=baseline, url=url, model="j", baseline_name="sft")
        summary = runner.run(dataclasses.replace(s, judge=js))
    assert summary["counts"]["generated"] == 0  # resumed from progress.jsonl
    j = summary["judge"]
    assert (j["pairs"], j["pairs_scored"], j["unmatched_ours"]) == (8, 8, 2)
    assert j["win_rate"] == 0.5 and j["orders_agree"] == 0.0 and j["first_position_picked"] == 1.0
    assert j["mean_length"]["sft"]["chars"] == j["mean_length"]["ours"]["chars"] + 1
    assert json.loads(open(os.path.join(s.out, "summary.json")).read())["judge"] == j


def test_demo_checker_accepts_every_chosen_answer_and_no_rejected_one():
    from apo_jax.data import demo
    from apo_jax.eval import checkers, scoring

    pairs = demo.generate_pairs(200, seed=5)
    for pair in pairs:
        chosen, rejected = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        assert checkers.demo(pair, chosen), pair
        assert not checkers.demo(pair, rejected), pair
        chat = {"messages": pair["chosen"][:-1]}  # a chat row: the last user turn is the question
        assert checkers.demo(chat, chosen)
    with pytest.raises(ValueError, match="not a demo question"):
        checkers.demo({"prompt": "Hello?"}, "hi")
    count = {"prompt": "How many times does the letter 'o' appear in the word 'cocoa'?"}
    assert checkers.demo(count, "The letter 'o' appears 2 times in the word 'cocoa'.")
    assert checkers.demo(count, "It appears 2 times.")
    # the right number about another word or letter (a demo sample after training) is wrong
    assert not checkers.demo(count, "The letter 'o' appears 2 times in the word 'committee'.")
    assert not checkers.demo(count, "The letter 'c' appears 2 times in the word 'cocoa'.")
    assert checkers.contains_answer({"answer": ["Paris", "paris, france"]}, "It is PARIS.")
    assert not checkers.contains_answer({"answer": 42}, "41")
    rows = [{"id": i, "response": "x"} for i in range(4)]
    with pytest.raises(scoring.CheckerError, match="raised on id 0"):
        scoring.apply_checker(checkers.contains_answer, rows, [{}] * 4, name="c")
    with pytest.raises(scoring.CheckerError, match="must return a bool"):
        scoring.apply_checker(lambda row, r: "yes", rows, [{}] * 4)
    scoring.apply_checker(lambda row, r: row["ok"], rows, [{"ok": i < 3} for i in range(4)])
    acc = scoring.accuracy(rows, "c")
    assert (acc["accuracy"], acc["correct"], acc["count"]) == (0.75, 3, 4)
    assert 0.0 <= acc["ci95"][0] < 0.75 < acc["ci95"][1] <= 1.0
    with pytest.raises(scoring.CheckerError, match="module:function"):
        scoring.load_checker("nocolon")
