"""CLAIR pipeline and client against a real OpenAI-style HTTP server on 127.0.0.1.

The server answers by rules keyed on tags in the prompt: [429], [500], [slow], [badjson] fail on
the first attempts and then succeed; [400] and [always500] always fail; the reviser's reply is
normal, has bold markers, no marker, an empty answer, or copies the answer unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import re
import signal
import threading
import time

import pytest

from apo_jax.data import clair
from apo_jax.data.clair_cache import RequestCache
from apo_jax.data.clair_client import OpenAIChatBackend, RequestError

SECRET = "sk-test-DO-NOT-LEAK-4f2a9c"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = json.loads(body)
        key = hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()
        with srv.lock:
            srv.auth.append(self.headers.get("Authorization"))
            srv.attempts[key] += 1
            attempt = srv.attempts[key]
            content = req["messages"][-1]["content"]
            if not content.startswith("You are"):
                srv.tags[key] = (re.findall(r"\[\w+\]", content) or [None])[0]
        status, text, headers = _rule(req, attempt)
        if status == "slow":
            time.sleep(0.6)
            status = 200
        if status == 200 and text is not None:
            payload = json.dumps(_completion(req, text)).encode()
        else:
            payload = (text or "error").encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:  # the client timed out and hung up
            return
        if status == 200 and text is not None:
            with srv.lock:
                srv.served[key] += 1
                srv.ok_total += 1
                fire = srv.ok_total == srv.interrupt_after
            if fire:  # a real SIGINT: it also wakes a main thread blocked waiting on the pool
                os.kill(os.getpid(), signal.SIGINT)


def _completion(req, text):
    words = sum(len(m["content"].split()) for m in req["messages"])
    return {
        "id": "x",
        "model": req["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": words, "completion_tokens": len(text.split())},
    }


def _rule(req, attempt):
    """(status, text, headers) for a request; status 'slow' sleeps past the client timeout."""
    content = req["messages"][-1]["content"]
    if content.startswith("You are a teacher"):
        return 200, _revise(content), {}
    if content.startswith("You are an impartial judge"):
        a = content.split("[Answer A]")[1]
        return 200, "The better one.\nVerdict: " + ("A" if "(seed 1)" in a else "B"), {}
    failures = {
        "[429]": (1, 429, {"Retry-After": "0"}),
        "[500]": (2, 500, {}),
        "[slow]": (1, "slow", {}),
        "[badjson]": (1, 200, {}),
        "[400]": (99, 400, {}),
        "[always500]": (99, 500, {}),
    }
    for tag, (times, status, headers) in failures.items():
        if tag in content and attempt <= times:
            return status, None if status != "slow" else f"late answer to {content}", headers
    seed = req.get("seed")
    suffix = "" if seed is None else f" (seed {seed})"
    if req["model"] == "strong":
        return 200, f"A strong answer to {content}", {}
    return 200, f"Answer to {content}{suffix}", {}


def _revise(content):
    answer = content.split("Student's answer:\n", 1)[1].strip()
    if "[nomarker]" in answer:
        return "This answer looks fine to me."
    if "[empty]" in answer:
        return "Reasoning: nothing\nCorrected answer:\n  \n"
    if "[same]" in answer:
        return f"Reasoning: all correct.\nCorrected answer: {answer}"
    if "[bold]" in answer:
        return f"**Reasoning:** tighten.\n\n**Corrected Answer**:\n{answer}, improved"
    return f"Reasoning: add a detail.\nCorrected answer: {answer}, improved"


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.auth, srv.attempts, srv.served = [], collections.Counter(), collections.Counter()
    srv.tags = {}
    srv.ok_total, srv.interrupt_after = 0, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


TAGS = ["plain", "[429]", "[500]", "[slow]", "[badjson]", "[400]", "[always500]", "[nomarker]",
        "[empty]", "[same]", "[bold]", "another plain"]  # fmt: skip


def _write_prompts(path, tags=TAGS):
    lines = [json.dumps({"prompt": f"Question {i} {tag}"}) for i, tag in enumerate(tags)]
    lines += ["{not json", json.dumps({"question": "no prompt field"})]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _args(srv, tmp_path, *extra):
    return [
        "clair", "--input", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out" / "clair.jsonl"),
        "--target_url", srv.url, "--target_model", "target-7b", "--target_api_key_env", "CLAIR_TEST_KEY",
        "--reviser_url", srv.url, "--reviser_model", "reviser-xl", "--reviser_api_key_env", "CLAIR_TEST_KEY",
        "--reviser_price_in", "2", "--reviser_price_out", "8",
        "--concurrency", "4", "--max_retries", "3", "--timeout", "0.3", "--backoff_base", "0.01",
        "--no_progress", *extra,
    ]  # fmt: skip


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_clair_pipeline_retries_rejects_and_keeps_the_key_secret(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    n = _write_prompts(tmp_path / "prompts.jsonl")
    assert clair.main(_args(server, tmp_path)) == 0
    out = tmp_path / "out"
    pairs, rejects = _read(out / "clair.jsonl"), _read(out / "clair.rejects.jsonl")
    assert len(pairs) + len(rejects) == n
    assert sorted(r["line"] for r in rejects) == [6, 7, 8, 9, 10, 13, 14]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[6].startswith("target request failed: HTTP 400")
    assert reasons[7].startswith("target request failed: gave up after 4 attempts: HTTP 500")
    assert "no 'Corrected answer:' marker" in reasons[8] and "empty corrected answer" in reasons[9]
    assert reasons[10] == "revision identical to the answer" and "malformed JSON" in reasons[13]
    assert reasons[14] == "field 'prompt' missing"
    by_prompt = {p["prompt"]: p for p in pairs}
    bold = by_prompt["Question 10 [bold]"]
    assert bold["chosen"] == [
        {"role": "user", "content": "Question 10 [bold]"},
        {"role": "assistant", "content": "Answer to Question 10 [bold], improved"},
    ]
    assert bold["rejected"][1]["content"] == "Answer to Question 10 [bold]"
    assert bold["reviser_reasoning"] == "tighten." and bold["reviser_model"] == "reviser-xl"
    assert by_prompt["Question 3 [slow]"]["rejected"][1]["content"] == "Answer to Question 3 [slow]"
    # Every retryable failure was retried, and the slow reply timed out once then came again.
    for tag, tries in {
        "[429]": 2,
        "[500]": 3,
        "[slow]": 2,
        "[badjson]": 2,
        "[always500]": 4,
    }.items():
        assert [v for k, v in server.attempts.items() if server.tags.get(k) == tag] == [tries], tag
    assert set(server.auth) == {f"Bearer {SECRET}"}
    manifest = json.loads((out / "clair.manifest.json").read_text())
    assert (
        manifest["written"] == 7 and manifest["rejected"] == 7 and manifest["status"] == "complete"
    )
    usage = manifest["roles"]["reviser"]["usage"]
    assert usage["completed"] == 10 and usage["prompt_tokens"] > 0
    expected = (usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8) / 1e6
    assert manifest["roles"]["reviser"]["usage"]["cost"] == pytest.approx(expected, abs=1e-6)
    assert manifest["roles"]["target"]["usage"]["retries"] == 8
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_resume_after_budget_and_ctrl_c_makes_no_duplicate_requests(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    # Python's own Ctrl-C behaviour, whatever handler an earlier test in this worker left behind.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tags = [f"plain {i}" for i in range(10)]
    _write_prompts(tmp_path / "prompts.jsonl", tags)
    assert clair.main(_args(server, tmp_path, "--max_requests", "4")) == 3
    assert sum(server.served.values()) == 4
    manifest = json.loads((tmp_path / "out" / "clair.manifest.json").read_text())
    assert manifest["status"].startswith("incomplete")
    server.interrupt_after = 9  # a Ctrl-C in the middle of the second run
    assert clair.main(_args(server, tmp_path)) == 130
    interrupted_at = sum(server.served.values())
    assert 9 <= interrupted_at < 20
    server.interrupt_after = None
    assert clair.main(_args(server, tmp_path)) == 0
    assert len(_read(tmp_path / "out" / "clair.jsonl")) == 10
    assert len(server.served) == 20 and set(server.served.values()) == {1}
    assert clair.main(_args(server, tmp_path)) == 0  # a finished job costs nothing to rerun
    assert sum(server.served.values()) == 20


def _backend(srv, **kw):
    return OpenAIChatBackend(srv.url, "m", api_key_env="CLAIR_UNSET_KEY", progress=False, **kw)


def test_retry_after_is_honoured(server, monkeypatch):
    monkeypatch.setitem(globals(), "_rule", lambda req, attempt: (
        (429, None, {"Retry-After": "0.5"}) if attempt == 1 else (200, "ok", {})))  # fmt: skip
    start = time.monotonic()
    assert _backend(server, backoff_base=0.001).complete(
        [[{"role": "user", "content": "x"}]], {}
    ) == ["ok"]
    assert time.monotonic() - start >= 0.5
    assert server.auth == [None, None]  # no key in the environment: no Authorization header


def test_rpm_limit_spaces_requests(server):
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    start = time.monotonic()
    replies = _backend(server, rpm=600, concurrency=5).complete(msgs, {})
    assert time.monotonic() - start >= 0.4  # 5 starts, 0.1 s apart
    assert replies == [f"Answer to q{i}" for i in range(5)]


def test_non_retryable_status_is_returned_not_raised(server):
    out = _backend(server).complete([[{"role": "user", "content": "[400]"}]], {})
    assert isinstance(out[0], RequestError) and "HTTP 400" in str(out[0])
    assert sum(server.attempts.values()) == 1


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "content": "A"}) + '\n{"key": "b", "cont')
    cache = RequestCache(path)
    assert cache.get("a")["content"] == "A" and cache.get("b") is None and cache.corrupt_lines == 1
    cache.put("c", {"content": "C"})
    cache.close()
    again = RequestCache(path)
    assert again.get("c")["content"] == "C" and len(again) == 2
    again.close()


def test_bad_input_is_one_line_error(tmp_path, capsys, server):
    code = clair.main(["clair", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                       "--target_url", server.url, "--target_model", "t", "--reviser_url", server.url,
                       "--reviser_model", "r"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing.jsonl" in err and "\n" not in err and "Traceback" not in err
    (tmp_path / "p.jsonl").write_text("{}\n")
    code = clair.main(["clair", "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                       "--target_url", server.url, "--reviser_url", server.url, "--reviser_model", "r"])  # fmt: skip
    assert code == 2 and "--target_model" in capsys.readouterr().err


def test_local_flax_target_makes_pairs_end_to_end(server, tmp_path, monkeypatch):
    """The demo-shaped model answers through the project's own sampler; the reviser is remote."""
    from flax import nnx

    from apo_jax.data import demo
    from apo_jax.models import config as model_config
    from apo_jax.models import hf
    from apo_jax.models.llama import Llama

    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    tok_dir = demo.train_tokenizer(
        [r["chosen"][-1]["content"] for r in demo.generate_pairs(200, seed=0)],
        str(tmp_path / "tok"),
    )
    cfg = model_config.get_preset("tiny", vocab_size=768)
    hf.save_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, str(tmp_path / "ckpt"), tokenizer_dir=tok_dir)
    n = _write_prompts(tmp_path / "prompts.jsonl", ["What is 2 + 3?", "Sort 3, 1, 2."])
    args = _args(server, tmp_path)
    i = args.index("--target_url")
    args[i : i + 6] = ["--target_checkpoint", str(tmp_path / "ckpt"), "--target_max_tokens", "12",
                       "--target_temperature", "0"]  # fmt: skip
    assert clair.main(args) == 0
    pairs = _read(tmp_path / "out" / "clair.jsonl")
    rejects = _read(tmp_path / "out" / "clair.rejects.jsonl")
    assert len(pairs) + len(rejects) == n and len(pairs) == 2
    for p in pairs:
        answer = p["rejected"][1]["content"]
        assert answer and p["chosen"][1]["content"] == f"{answer}, improved"
        assert p["target_model"] == str(tmp_path / "ckpt")
