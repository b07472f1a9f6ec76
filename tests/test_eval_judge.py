"""Judge win rates against a loopback OpenAI-compatible server: both orders, malformed replies."""

import json
import threading

import pytest
from eval_helpers import chat_reply, loopback_server

from apo_jax.clair import keys
from apo_jax.eval import judge, prompts
from apo_jax.eval.judge import parse_verdict

# id -> (our response, the baseline's response)
CASES = {
    "win": ("a better answer", "a worse one"),
    "loss": ("a worse one", "a better answer"),
    "tie": ("plain", "also plain"),
    "biased": ("plain BIAS", "also plain"),  # the judge always says A: the two orders cancel
    "garbled": ("plain GARBLE", "also plain"),  # no verdict in either reply
    "glitch": ("a better answer GLITCH", "a worse one"),  # first reply is not JSON: retried
}


SEEN: list[tuple[str, str]] = []  # (reply A, reply B) of every request
LOCK = threading.Lock()


def _judge(body: dict) -> bytes:
    user = body["messages"][1]["content"]
    a = user.split("<reply A>\n")[1].split("\n</reply A>")[0]
    b = user.split("<reply B>\n")[1].split("\n</reply B>")[0]
    with LOCK:
        first_glitch = "GLITCH" in a + b and (a, b) not in SEEN
        SEEN.append((a, b))
    if first_glitch:
        return b"{not json"
    if "GARBLE" in a + b:
        return chat_reply("Both have merits; I cannot say.")
    if "BIAS" in a + b:
        return chat_reply("Reply A, since it came first.\n[[A]]")
    if "better" in a:
        return chat_reply("A is right. Verdict: **A**" if "GLITCH" in a else "A is right.\n[[A]]")
    if "better" in b:
        return chat_reply("B is right; [[A]] would be wrong.\n[[B]]")
    return chat_reply("Equivalent.\n[[TIE]]")


@pytest.fixture
def server():
    SEEN.clear()
    with loopback_server(_judge) as url:
        yield url


def _inputs(tmp_path):
    examples, rows, base = [], [], []
    for i, (key, (mine, theirs)) in enumerate(CASES.items()):
        examples.append(prompts.parse({"id": key, "prompt": f"question {key}"}, i))
        rows.append(
            {
                "id": key,
                "prompt": f"question {key}",
                "response": mine,
                "num_tokens": 3,
                "finish_reason": "stop",
            }
        )
        base.append({"id": key, "response": theirs, "num_tokens": 5})
    examples.append(prompts.parse({"id": "only_ours", "prompt": "q"}, len(examples)))
    rows.append({"id": "only_ours", "prompt": "q", "response": "x", "num_tokens": 1})
    base.append({"id": "only_baseline", "response": "y", "num_tokens": 1})
    path = tmp_path / "baseline.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in base) + "{torn\n")
    return examples, rows, str(path)


def test_win_rate_judges_both_orders_and_survives_malformed_replies(server, tmp_path):
    examples, rows, baseline = _inputs(tmp_path)
    s = judge.JudgeSettings(
        baseline=baseline,
        url=server,
        model="judge",
        baseline_name="sft",
        concurrency=2,
        max_retries=2,
        backoff_base=0.01,
    )
    got = judge.run(s, str(tmp_path), examples, rows)
    for mine, theirs in CASES.values():  # every pair asked in both orders
        assert SEEN.count((mine, theirs)) >= 1 and SEEN.count((theirs, mine)) >= 1
    assert SEEN.count(("a better answer GLITCH", "a worse one")) == 2  # retried once
    # win 1, loss 0, tie 0.5, biased (A then A) 0.5, glitch 1; garbled has no readable verdict
    assert got["win_rate"] == pytest.approx(3 / 5)
    assert (got["wins"], got["ties"], got["losses"]) == (2, 2, 1)
    assert got["pairs"] == 6 and got["pairs_scored"] == 5 and got["replies_unparsed"] == 2
    assert got["unmatched_ours"] == 1 and got["unmatched_baseline"] == 1
    assert got["baseline_lines_unusable"] == 1 and got["requests_failed"] == 0
    assert got["orders_agree"] == pytest.approx(4 / 5)  # the biased pair disagrees with itself
    lo, hi = got["ci95"]
    assert 0.0 <= lo < 0.6 < hi <= 1.0
    assert (
        got["mean_length"]["ours"]["tokens"] == 3.0 and got["mean_length"]["sft"]["tokens"] == 5.0
    )
    lines = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == list(CASES)
    assert lines[1]["ours_first"]["verdict"] == "B" and lines[1]["baseline_first"]["verdict"] == "A"
    asked = len(SEEN)
    again = judge.run(s, str(tmp_path), examples, rows)  # every reply now comes from the cache
    assert len(SEEN) == asked and again["win_rate"] == got["win_rate"]


def test_failed_requests_are_counted_not_scored(tmp_path):
    examples, rows, baseline = _inputs(tmp_path)
    s = judge.JudgeSettings(
        baseline=baseline,
        url="http://127.0.0.1:9/v1",
        model="judge",
        max_retries=0,
        backoff_base=0.01,
    )
    got = judge.run(s, str(tmp_path), examples, rows)
    assert got["requests_failed"] == 12 and got["pairs_scored"] == 0 and got["win_rate"] is None
    with pytest.raises(judge.JudgeError, match="--judge_url"):
        judge.run(judge.JudgeSettings(baseline=baseline, url="", model=""), str(tmp_path), [], [])


@pytest.mark.parametrize(
    "text, want",
    [
        ("[[A]]", "A"),
        ("so... [[ b ]]", "B"),
        ("[[TIE]]", "tie"),
        ("[[C]]", "tie"),
        ("My final verdict is tie: [[A=B]]", "tie"),
        ("[[B>A]]", "B"),
        ("[[A>>B]]", "A"),
        ("[[A<B]]", "B"),
        ("[[A]] at first, but on reflection [[B]]", "B"),
        ("Final verdict: Reply B", "B"),
        ("verdict - **A**", "A"),
        ("Verdict: tie", "tie"),
        ("A seems better.", None),
        ("", None),
        ("[[maybe]]", None),
    ],
)
def test_parser_tolerates_verdict_styles(text, want):
    assert parse_verdict(text) == want


def test_judge_key_rules_are_checked_before_any_request(tmp_path, monkeypatch):
    _, _, baseline = _inputs(tmp_path)
    monkeypatch.delenv("APO_JAX_TEST_JUDGE_KEY", raising=False)
    missing = judge.JudgeSettings(
        baseline=baseline,
        url="http://127.0.0.1:9/v1",
        model="j",
        api_key_env="APO_JAX_TEST_JUDGE_KEY",
    )
    with pytest.raises(keys.ApiKeyError, match=r"\$APO_JAX_TEST_JUDGE_KEY is not set"):
        judge.check(missing)
    monkeypatch.setenv("APO_JAX_TEST_JUDGE_KEY", "sk-secret")
    judge.check(missing)  # set now, and loopback http may carry it
    remote = judge.JudgeSettings(
        baseline=baseline,
        url="http://judge.example:8000/v1",
        model="j",
        api_key_env="APO_JAX_TEST_JUDGE_KEY",
    )
    with pytest.raises(keys.ApiKeyError, match="http"):
        judge.check(remote)
