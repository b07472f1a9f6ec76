"""A key never crosses a proxy in clear text, on every HTTP path (CLAIR client, eval judge).

Each test starts a recording proxy and an endpoint on loopback threads and sets the proxy
environment variables urllib reads; the proxy must never see the key.
"""

from __future__ import annotations

import json
import socketserver
import threading

import pytest

from apo_jax.clair import keys
from apo_jax.clair.client import OpenAIChatBackend, RequestError
from apo_jax.eval import judge

KEY = "sk-proxy-test-0123456789"
REPLY = {"choices": [{"message": {"content": "hello"}, "finish_reason": "stop"}], "usage": {}}


class _Recorder(socketserver.StreamRequestHandler):
    """Keeps the head of whatever reaches it; answers a chat completion (as a proxy forwarding
    it would) or, to CONNECT, 502 (the tunnel is refused: the test only looks at what came)."""

    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                break
            head += line
        with self.server.lock:
            self.server.seen.append(head.decode("latin-1"))
        if head.startswith(b"CONNECT"):
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        self.rfile.read(length)
        body = json.dumps(REPLY).encode()
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


def _serve():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Recorder)
    srv.daemon_threads = True
    srv.lock, srv.seen = threading.Lock(), []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    return srv


@pytest.fixture
def proxy_and_endpoint(monkeypatch):
    proxy, endpoint = _serve(), _serve()
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("https_proxy", proxy.url)
    monkeypatch.setenv("PROXY_TEST_KEY", KEY)
    yield proxy, endpoint
    for srv in (proxy, endpoint):
        srv.shutdown()
        srv.server_close()


def _ask(backend):
    return backend.complete([[{"role": "user", "content": "hi"}]], {})[0]


def test_a_keyed_loopback_request_never_goes_through_a_plain_http_proxy(proxy_and_endpoint):
    proxy, endpoint = proxy_and_endpoint
    backend = OpenAIChatBackend(
        endpoint.url + "/v1", "m", api_key_env="PROXY_TEST_KEY", max_retries=0, progress=False
    )
    assert _ask(backend) == "hello"
    assert proxy.seen == []  # before the fix the proxy got "Authorization: Bearer <key>"
    assert len(endpoint.seen) == 1 and f"Bearer {KEY}" in endpoint.seen[0]


def test_a_keyed_plain_http_request_off_this_host_through_a_proxy_is_refused(proxy_and_endpoint):
    proxy, _ = proxy_and_endpoint
    with pytest.raises(
        keys.ApiKeyError, match=r"plain-http proxy http://127\.0\.0\.1:\d+ .*no_proxy"
    ):
        OpenAIChatBackend(
            "http://10.255.255.1/v1",
            "m",
            api_key_env="PROXY_TEST_KEY",
            allow_http_key=True,
            progress=False,
        )
    assert proxy.seen == []


def test_a_request_without_a_key_still_uses_the_proxy(proxy_and_endpoint):
    proxy, endpoint = proxy_and_endpoint
    backend = OpenAIChatBackend("http://10.255.255.1/v1", "m", max_retries=0, progress=False)
    assert _ask(backend) == "hello"
    assert len(proxy.seen) == 1 and proxy.seen[0].startswith("POST http://10.255.255.1/v1/")
    assert endpoint.seen == []


def test_https_through_a_proxy_is_a_tunnel_the_proxy_cannot_read(proxy_and_endpoint):
    proxy, _ = proxy_and_endpoint
    backend = OpenAIChatBackend(
        "https://api.example.invalid/v1",
        "m",
        api_key_env="PROXY_TEST_KEY",
        max_retries=0,
        progress=False,
    )
    reply = _ask(backend)
    assert isinstance(reply, RequestError)  # our proxy refuses the tunnel
    assert len(proxy.seen) == 1 and proxy.seen[0].startswith("CONNECT api.example.invalid:443")
    assert KEY not in proxy.seen[0] and "Authorization" not in proxy.seen[0]


def test_the_eval_judge_follows_the_same_rule(proxy_and_endpoint, tmp_path):
    proxy, endpoint = proxy_and_endpoint
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("")
    settings = judge.JudgeSettings(
        baseline=str(baseline),
        url=endpoint.url + "/v1",
        model="j",
        api_key_env="PROXY_TEST_KEY",
        max_retries=0,
    )
    assert _ask(judge._backend(settings, str(tmp_path))) == "hello"
    assert proxy.seen == [] and f"Bearer {KEY}" in endpoint.seen[0]
