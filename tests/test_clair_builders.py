"""Baseline pair builders (stronger-preferred, on-policy judge, off-policy judge) and the local backend."""

import inspect
import json

import pytest

from apo_jax.clair import cli
from apo_jax.clair.builders import (
    Role,
    build_offpolicy_judge,
    build_onpolicy_judge,
    build_stronger_preferred,
    completion_score,
)
from apo_jax.clair.cache import RequestCache, Usage
from apo_jax.clair.client import RequestError
from apo_jax.clair.ledger import BuildResult, PromptRow, Row
from apo_jax.clair.local import LocalBackend


class FakeBackend:
    """Answers with ``fn(last_user_content, params)``; records every call."""

    def __init__(self, model, fn):
        self.model, self.fn, self.usage, self.calls = model, fn, Usage(), []

    def complete(self, messages_list, params):
        self.calls.append((messages_list, dict(params)))
        return [self.fn(m[-1]["content"], params) for m in messages_list]


def _rows(*prompts):
    return [PromptRow(i + 1, {"prompt": p}, p) for i, p in enumerate(prompts)]


def _target(content, params):
    if "fail" in content:
        return RequestError("HTTP 400: nope")
    return f"ans({content}) seed={params.get('seed')}"


def test_stronger_preferred_pairs_the_stronger_answer_over_the_target():
    def strong(content, params):
        return "same" if "same" in content else f"STRONG({content})"

    target = Role(FakeBackend("t", lambda c, p: "same" if "same" in c else _target(c, p)))
    result = build_stronger_preferred(
        _rows("q1", "fail", "same"), target, Role(FakeBackend("s", strong)), BuildResult()
    )
    assert list(result.pairs) == [1]
    pair = result.pairs[1]
    assert pair["chosen"][1]["content"] == "STRONG(q1)" and pair["rejected"][1][
        "content"
    ].startswith("ans(q1)")
    assert pair["stronger_model"] == "s" and pair["target_model"] == "t"
    assert (result.rejects[2]["stage"], result.rejects[2]["reason"]) == ("target", "request_failed")
    assert result.rejects[2]["detail"] == "HTTP 400: nope"
    assert (result.rejects[3]["stage"], result.rejects[3]["reason"]) == (
        "stronger",
        "identical_answers",
    )


def _judge_prefers_seed_4(content, params):
    if "[tie]" in content:
        return "Verdict: tie"
    if "[mumble]" in content:
        return "Both have merits."
    answer_a = content.split("[Answer A]")[1].split("[End of answer A]")[0]
    return "Reasoning...\n**Verdict:** " + ("A" if "seed=4" in answer_a else "B")


def test_onpolicy_judge_maps_verdicts_through_the_random_order():
    prompts = [f"q{i}" for i in range(20)] + ["[tie]", "[mumble]"]
    target = Role(FakeBackend("t", _target), {"temperature": 1.0})
    judge = FakeBackend("j", _judge_prefers_seed_4)
    result = build_onpolicy_judge(_rows(*prompts), target, Role(judge), BuildResult(), seed=3)
    assert [c[1]["seed"] for c in target.backend.calls] == [3, 4]  # two distinct samples
    assert len(result.pairs) == 20
    orders = {tuple(p["judge_order"]) for p in result.pairs.values()}
    assert orders == {("sample_0", "sample_1"), ("sample_1", "sample_0")}  # both orders used
    for pair in result.pairs.values():
        # The judge's pick, whatever the order it was shown in.
        assert pair["chosen"][1]["content"].endswith("seed=4")
        assert pair["rejected"][1]["content"].endswith("seed=3")
        assert pair["judge_verdict"] == ("A" if pair["judge_order"][0] == "sample_1" else "B")
    assert result.rejects[21]["reason"] == "judge_tie" and "judge_order" in result.rejects[21]
    assert (
        result.rejects[22]["reason"] == "no_verdict" and "Verdict" in result.rejects[22]["detail"]
    )
    assert result.rejects[22]["reply"] == "Both have merits."
    again = build_onpolicy_judge(_rows(*prompts), target, Role(judge), BuildResult(), seed=3)
    assert [p["judge_order"] for p in again.pairs.values()] == [
        p["judge_order"] for p in result.pairs.values()
    ]


@pytest.mark.parametrize(
    "completion, score",
    [
        ({"overall_score": 7.5, "ratings": [1]}, 7.5),
        ({"ratings": {"helpfulness": 4, "honesty": "5"}}, 4.5),
        ({"annotations": {"helpfulness": {"Rating": "3"}, "honesty": {"Rating": "N/A"}}}, 3.0),
        ({"ratings": [2, 4]}, 3.0),
        ({"ratings": "N/A"}, None),
        ({}, None),
    ],
)
def test_completion_score(completion, score):
    assert completion_score(completion) == score


def _judged(prompt, *scores):
    return {
        "prompt": prompt,
        "completions": [
            {"response": f"r{i}", "overall_score": s, "model": f"m{i}"}
            for i, s in enumerate(scores)
        ],
    }


def test_offpolicy_judge_best_versus_lower_and_ties_rejected(tmp_path, capsys):
    records = [
        _judged("p1", 3, 9, 5),
        _judged("p2", 6, 6),
        _judged("p3", 8),
        {
            "instruction": "p4",
            "completions": [
                {"response": "x", "ratings": {"a": {"Rating": "2"}}},
                {"response": "y", "ratings": [4]},
            ],
        },
    ]
    path = tmp_path / "uf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n[1, 2]\n")
    out = tmp_path / "off.jsonl"
    assert cli.main(["apo_jax.clair", "offpolicy", f"--input={path}", f"--output={out}"]) == 0
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    rejects = {
        r["line"]: r["reason"]
        for r in map(json.loads, (tmp_path / "off.rejects.jsonl").read_text().splitlines())
    }
    assert [p["prompt"] for p in pairs] == ["p1", "p4"]
    assert pairs[0]["chosen"][1]["content"] == "r1" and pairs[0]["rejected"][1]["content"] in (
        "r0",
        "r2",
    )
    assert pairs[0]["chosen_score"] == 9 and pairs[1]["chosen"][1]["content"] == "y"
    assert rejects == {2: "score_tie", 3: "too_few_scored_completions", 5: "not_an_object"}
    manifest = json.loads((tmp_path / "off.manifest.json").read_text())
    assert manifest["written"] + manifest["rejected"] == 5


def test_offpolicy_choice_is_seeded():
    rows = [Row(i, _judged(f"p{i}", 9, 1, 2, 3, 4)) for i in range(1, 30)]
    picks = [
        p["rejected"][1]["content"]
        for p in build_offpolicy_judge(rows, BuildResult(), seed=1).pairs.values()
    ]
    assert picks == [
        p["rejected"][1]["content"]
        for p in build_offpolicy_judge(rows, BuildResult(), seed=1).pairs.values()
    ]
    assert len(set(picks)) > 1


class FakeTokenizer:
    eos_token_id = 4  # "<eot>"

    def convert_tokens_to_ids(self, token):
        return {"<|eot_id|>": 4}.get(token)

    def apply_chat_template(self, chat, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<{m['role']}>{m['content']}" for m in chat) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_local_backend_renders_samples_decodes_and_resumes(tmp_path):
    calls = []

    def fake_generate(model, prompts, *, max_new_tokens, temperature, top_p, seed, stop_tokens):
        assert stop_tokens == (4,)  # sampling stops at end of turn
        calls.append((len(prompts), max_new_tokens, temperature, seed))
        return [[ord(c) for c in f"hi{len(p)}"] for p in prompts]  # completion ids only

    def make(cache):
        return LocalBackend(
            "ckpt",
            name="local-1b",
            batch_size=2,
            cache=cache,
            loader=lambda path: ("MODEL", FakeTokenizer()),
            generate_fn=fake_generate,
        )

    chats = [[{"role": "user", "content": c}] for c in ("a", "bb", "ccc")]
    with RequestCache(tmp_path / "c.jsonl") as cache:
        out = make(cache).complete(chats, {"max_tokens": 7, "temperature": 0.5, "seed": 2})
    assert out == ["hi18", "hi19", "hi20"]  # len("<user>a<assistant>") == 18
    assert calls == [(2, 7, 0.5, 2), (1, 7, 0.5, 2)]
    with RequestCache(tmp_path / "c.jsonl") as cache:
        backend = make(cache)
        assert backend.complete(chats, {"max_tokens": 7, "temperature": 0.5, "seed": 2}) == out
    assert len(calls) == 2 and backend.usage.cache_hits == 3


def test_real_generate_accepts_the_local_backend_call():
    from apo_jax.models.generate import generate

    params = inspect.signature(generate).parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in ("max_new_tokens", "temperature", "top_p", "seed", "stop_tokens"):
        assert accepts_kwargs or name in params, name
