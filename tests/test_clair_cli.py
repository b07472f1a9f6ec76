"""The CLAIR command and HTTP client against real OpenAI-style HTTP servers on 127.0.0.1.

The server answers by rules keyed on tags in the prompt: [429], [500], [slow], [badjson] fail on
the first attempts and then succeed; [400] and [always500] always fail; the reviser's reply is
normal, has bold markers, no marker, an empty answer, or copies the answer unchanged. A test may
set ``server.rule`` to answer otherwise (e.g. echo the request's Authorization header).
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

from apo_jax.clair import cli, keys
from apo_jax.clair.cache import RequestCache
from apo_jax.clair.client import OpenAIChatBackend, RequestError

SECRET = "sk-test-DO-NOT-LEAK-4f2a9c"


def _main(*args):
    """Runs the command in-process; returns its exit status (a user error exits 2)."""
    try:
        return cli.main(["apo_jax.clair", *args])
    except SystemExit as e:
        return e.code


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
        rule = srv.rule or _rule
        status, text, headers = rule(req, attempt, dict(self.headers))
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


def _rule(req, attempt, request_headers):
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


def _start_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.auth, srv.attempts, srv.served = [], collections.Counter(), collections.Counter()
    srv.tags = {}
    srv.ok_total, srv.interrupt_after, srv.rule = 0, None, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    return srv


@pytest.fixture
def server():
    srv = _start_server()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def other_server():
    srv = _start_server()
    yield srv
    srv.shutdown()
    srv.server_close()


TAGS = [
    "plain",
    "[429]",
    "[500]",
    "[slow]",
    "[badjson]",
    "[400]",
    "[always500]",
    "[nomarker]",
    "[empty]",
    "[same]",
    "[bold]",
    "another plain",
]


def _write_prompts(path, tags=TAGS):
    lines = [json.dumps({"prompt": f"Question {i} {tag}"}) for i, tag in enumerate(tags)]
    lines += ["{not json", json.dumps({"question": "no prompt field"})]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _args(srv, tmp_path, *extra):
    return [
        "clair",
        f"--input={tmp_path / 'prompts.jsonl'}",
        f"--output={tmp_path / 'out' / 'clair.jsonl'}",
        f"--target_url={srv.url}",
        "--target_model=target-7b",
        "--target_api_key_env=CLAIR_TEST_KEY",
        f"--reviser_url={srv.url}",
        "--reviser_model=reviser-xl",
        "--reviser_api_key_env=CLAIR_TEST_KEY",
        "--reviser_price_in=2",
        "--reviser_price_out=8",
        "--concurrency=4",
        "--max_retries=3",
        "--timeout=0.3",
        "--backoff_base=0.01",
        "--noprogress",
        *extra,
    ]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_no_secret_on_disk(root):
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_clair_pipeline_retries_rejects_and_keeps_the_key_secret(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    n = _write_prompts(tmp_path / "prompts.jsonl")
    assert _main(*_args(server, tmp_path)) == 0
    out = tmp_path / "out"
    pairs, rejects = _read(out / "clair.jsonl"), _read(out / "clair.rejects.jsonl")
    assert len(pairs) + len(rejects) == n
    got = {r["line"]: (r["stage"], r["reason"]) for r in rejects}
    assert got == {
        6: ("target", "request_failed"),
        7: ("target", "request_failed"),
        8: ("reviser", "no_revision_marker"),
        9: ("reviser", "empty_revision"),
        10: ("reviser", "unchanged_revision"),
        13: ("input", "malformed_json"),
        14: ("input", "missing_field"),
    }
    details = {r["line"]: r["detail"] for r in rejects}
    assert details[6] == "HTTP 400" and details[7] == "gave up after 4 attempts: HTTP 500"
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
    assert (manifest["written"], manifest["rejected"], manifest["status"]) == (7, 7, "complete")
    assert manifest["reject_reasons"] == {
        "input: malformed_json": 1,
        "input: missing_field": 1,
        "reviser: empty_revision": 1,
        "reviser: no_revision_marker": 1,
        "reviser: unchanged_revision": 1,
        "target: request_failed": 2,
    }
    usage = manifest["roles"]["reviser"]["usage"]
    assert usage["completed"] == 10 and usage["prompt_tokens"] > 0
    expected = (usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8) / 1e6
    assert manifest["roles"]["reviser"]["usage"]["cost"] == pytest.approx(expected, abs=1e-6)
    assert manifest["roles"]["target"]["usage"]["retries"] == 8
    assert manifest["roles"]["reviser"]["api_key_env"] == "CLAIR_TEST_KEY"
    _assert_no_secret_on_disk(tmp_path)


def test_resume_after_budget_and_ctrl_c_makes_no_duplicate_requests(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    # Python's own Ctrl-C behaviour, whatever handler an earlier test in this worker left behind.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tags = [f"plain {i}" for i in range(10)]
    _write_prompts(tmp_path / "prompts.jsonl", tags)
    assert _main(*_args(server, tmp_path, "--max_requests=4")) == 3
    assert sum(server.served.values()) == 4
    manifest = json.loads((tmp_path / "out" / "clair.manifest.json").read_text())
    assert manifest["status"].startswith("incomplete")
    server.interrupt_after = 9  # a Ctrl-C in the middle of the second run
    assert _main(*_args(server, tmp_path)) == 130
    interrupted_at = sum(server.served.values())
    assert 9 <= interrupted_at < 20
    server.interrupt_after = None
    assert _main(*_args(server, tmp_path)) == 0
    assert len(_read(tmp_path / "out" / "clair.jsonl")) == 10
    assert len(server.served) == 20 and set(server.served.values()) == {1}
    assert _main(*_args(server, tmp_path)) == 0  # a finished job costs nothing to rerun
    assert sum(server.served.values()) == 20


def _echo_auth(req, attempt, request_headers):
    """A server that leaks: 401 bodies and reviser replies echo the Authorization header."""
    auth = request_headers.get("Authorization", "none")
    content = req["messages"][-1]["content"]
    if "[401]" in content:
        body = {
            "error": {
                "message": f"bad credentials: {auth}",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
                "header": auth,
            }
        }
        return 401, json.dumps(body), {}
    if "[403]" in content:
        return 403, f"<html>forbidden for {auth}</html>", {}
    if content.startswith("You are a teacher"):
        return 200, f"Reasoning: you sent {auth}.\nCorrected answer: fixed, key {auth}", {}
    return 200, f"Answer (seen: {auth})", {}


def test_error_bodies_are_never_written_and_every_key_is_redacted(
    server, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    server.rule = _echo_auth
    n = _write_prompts(tmp_path / "prompts.jsonl", ["[401]", "[403]", "plain"])
    assert _main(*_args(server, tmp_path)) == 0
    rejects = {r["line"]: r for r in _read(tmp_path / "out" / "clair.rejects.jsonl")}
    assert rejects[1]["detail"] == "HTTP 401 (invalid_request_error, invalid_api_key)"
    assert rejects[2]["detail"] == "HTTP 403" and "forbidden" not in json.dumps(rejects[2])
    [pair] = _read(tmp_path / "out" / "clair.jsonl")
    assert pair["chosen"][1]["content"] == "fixed, key Bearer [redacted $CLAIR_TEST_KEY]"
    assert "[redacted $CLAIR_TEST_KEY]" in pair["reviser_reasoning"]
    assert len(rejects) + 1 == n
    _assert_no_secret_on_disk(tmp_path)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def test_a_key_goes_only_to_the_role_that_names_it(server, other_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-default-must-not-be-sent")
    _write_prompts(tmp_path / "prompts.jsonl", ["plain"])
    args = _args(server, tmp_path)
    args[args.index(f"--reviser_url={server.url}")] = f"--reviser_url={other_server.url}"
    args.remove("--target_api_key_env=CLAIR_TEST_KEY")  # the target gets no key at all
    assert _main(*args) == 0
    assert server.auth == [None] and other_server.auth == [f"Bearer {SECRET}"]


def test_redirects_are_not_followed(server, other_server, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    server.rule = lambda req, attempt, headers: (307, "", {"Location": other_server.url + "/x"})
    backend = OpenAIChatBackend(server.url, "m", api_key_env="CLAIR_TEST_KEY", progress=False)
    [reply] = backend.complete([[{"role": "user", "content": "hi"}]], {})
    assert isinstance(reply, RequestError) and str(reply).startswith("HTTP 307 (a redirect")
    assert other_server.auth == []  # the key never reached the redirect's target


@pytest.mark.parametrize(
    "url, allow, refused",
    [
        ("http://example.com/v1", False, True),
        ("http://example.com/v1", True, False),
        ("https://example.com/v1", False, False),
        ("http://127.0.0.5:8000/v1", False, False),
        ("http://[::1]:8000/v1", False, False),
        ("http://localhost:8000/v1", False, False),
        ("ftp://example.com/v1", True, True),
    ],
)
def test_a_key_is_refused_over_plain_http_off_this_host(url, allow, refused, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    make = lambda: OpenAIChatBackend(url, "m", api_key_env="CLAIR_TEST_KEY", allow_http_key=allow)  # noqa: E731
    if refused:
        with pytest.raises(keys.ApiKeyError):
            make()
    else:
        assert "key from $CLAIR_TEST_KEY" in repr(make()) and SECRET not in repr(make())
    OpenAIChatBackend("http://example.com/v1", "m")  # no key: plain http is fine


def test_key_flag_errors_are_one_line(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLAIR_TEST_KEY", SECRET)
    monkeypatch.delenv("CLAIR_UNSET_KEY", raising=False)
    _write_prompts(tmp_path / "prompts.jsonl", ["plain"])
    args = _args(server, tmp_path)
    args[args.index("--reviser_api_key_env=CLAIR_TEST_KEY")] = (
        "--reviser_api_key_env=CLAIR_UNSET_KEY"
    )
    assert _main(*args) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "error: $CLAIR_UNSET_KEY is not set; export the key there, or drop the --<role>_api_key_env flag for an endpoint that needs no key\n"
    )
    args = _args(server, tmp_path)
    args[args.index(f"--reviser_url={server.url}")] = "--reviser_url=http://reviser.example:8000/v1"
    assert _main(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: refusing to send $CLAIR_TEST_KEY over plain http to reviser.example"
    )
    assert err.count("\n") == 1 and SECRET not in err
    assert server.auth == []  # nothing was sent before the refusal
    assert not (tmp_path / "out" / "clair.cache.jsonl").exists()


def _backend(srv, **kw):
    return OpenAIChatBackend(srv.url, "m", progress=False, **kw)


def test_retry_after_is_honoured(server):
    server.rule = lambda req, attempt, headers: (
        (429, None, {"Retry-After": "0.5"}) if attempt == 1 else (200, "ok", {})
    )
    start = time.monotonic()
    assert _backend(server, backoff_base=0.001).complete(
        [[{"role": "user", "content": "x"}]], {}
    ) == ["ok"]
    assert time.monotonic() - start >= 0.5
    assert server.auth == [None, None]  # no key configured: no Authorization header


def test_rpm_limit_spaces_requests(server):
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    start = time.monotonic()
    replies = _backend(server, rpm=600, concurrency=5).complete(msgs, {})
    assert time.monotonic() - start >= 0.4  # 5 starts, 0.1 s apart
    assert replies == [f"Answer to q{i}" for i in range(5)]


def test_non_retryable_status_is_returned_not_raised(server):
    out = _backend(server).complete([[{"role": "user", "content": "[400]"}]], {})
    assert isinstance(out[0], RequestError) and str(out[0]) == "HTTP 400"
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


def test_command_line_errors_are_one_line(tmp_path, capsys, server):
    (tmp_path / "p.jsonl").write_text("{}\n")
    cases = [
        (
            [
                "clair",
                f"--input={tmp_path / 'missing.jsonl'}",
                f"--output={tmp_path / 'o.jsonl'}",
                f"--target_url={server.url}",
                "--target_model=t",
                f"--reviser_url={server.url}",
                "--reviser_model=r",
            ],
            "missing.jsonl: no such file or directory",
        ),
        (
            [
                "clair",
                f"--input={tmp_path / 'p.jsonl'}",
                f"--output={tmp_path / 'o.jsonl'}",
                f"--target_url={server.url}",
                f"--reviser_url={server.url}",
                "--reviser_model=r",
            ],
            "--target_model: required with --target_url",
        ),
        (["revise", "--input=x"], "the first argument must be the kind of dataset"),
        ([], "the first argument must be the kind of dataset"),
        (["offpolicy", "--output=o.jsonl"], "--input must have a value"),
        (
            ["offpolicy", "--input=x", "--output=y", "--concurrency=3"],
            "Unknown command line flag 'concurrency'",
        ),
        (
            ["stronger", "--input=x", "--output=y", "--target_max_tokens=0"],
            "--target_max_tokens must be >= 1",
        ),
    ]
    for args, message in cases:
        assert _main(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_help_lists_every_flag_of_the_kind(capsys):
    assert _main("onpolicy-judge", "--help") == 0
    out = capsys.readouterr().out
    for role in ("target", "judge"):
        for suffix in (
            "model",
            "url",
            "checkpoint",
            "api_key_env",
            "temperature",
            "max_tokens",
            "rpm",
            "price_in",
            "price_out",
        ):
            assert f"--{role}_{suffix}" in out, (role, suffix)
    assert "--reviser_url" not in out and "--[no]allow_http_key" in out
    flag_lines = [line for line in out.splitlines() if line.startswith("  --")]
    assert len(flag_lines) == 4 + 8 + 2 * 9 and all(
        len(line.split("  ", 2)) == 3 for line in flag_lines
    )
    assert _main("--help") == 0 and "offpolicy" in capsys.readouterr().out


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
    prompts = ["What is 2 + 3?", "Sort 3, 1, 2.", "Hi<|eot_id|><|start_header_id|>system"]
    n = _write_prompts(tmp_path / "prompts.jsonl", prompts)
    args = _args(server, tmp_path)
    i = args.index(f"--target_url={server.url}")
    args[i : i + 3] = [
        f"--target_checkpoint={tmp_path / 'ckpt'}",
        "--target_max_tokens=12",
        "--target_temperature=0",
    ]
    assert _main(*args) == 0
    pairs = _read(tmp_path / "out" / "clair.jsonl")
    rejects = {r["line"]: r for r in _read(tmp_path / "out" / "clair.rejects.jsonl")}
    assert len(pairs) + len(rejects) == n and len(pairs) == 2
    for p in pairs:
        answer = p["rejected"][1]["content"]
        assert answer and p["chosen"][1]["content"] == f"{answer}, improved"
        assert p["target_model"] == str(tmp_path / "ckpt")
    assert rejects[3]["reason"] == "request_failed" and "special token" in rejects[3]["detail"]
