"""Chat backends for CLAIR data: the Backend protocol and an OpenAI-compatible HTTP client.

:class:`OpenAIChatBackend` speaks the chat-completions protocol of vLLM, TGI and hosted APIs
with the standard library only. It runs requests in a thread pool of ``concurrency`` workers,
spaces them to at most ``rpm`` per minute, retries 429/5xx, malformed replies, connection
errors and timeouts with exponential backoff and jitter (honouring ``Retry-After``), counts
tokens and cost, and appends every finished request to a :class:`RequestCache` so a rerun
resumes.

Keys (see :mod:`apo_jax.clair.keys`): the key is read from the environment variable named by
``api_key_env`` (none by default: no key is sent), placed only in the ``Authorization`` header
of requests to this backend's URL, and refused over plain http to a host that is not loopback;
a keyed plain-http request never goes through a proxy (``keys.proxies_for``).
Redirects are not followed (urllib would carry the header to the new host). An error reply's
body is never kept: a failed request records its status and at most the ``type`` / ``code``
identifiers of an OpenAI-style error object, and every text this backend returns or caches has
the key value redacted.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import http.client
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from tqdm import tqdm

from apo_jax.clair import keys
from apo_jax.clair.cache import RequestCache, Usage, request_key
from apo_jax.clair.prompts import Messages

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RequestError(Exception):
    """A request that failed for good; returned in place of its reply, never raised by backends."""


class BudgetExhausted(RuntimeError):
    """Raised after ``max_requests`` new requests finished; rerunning continues the job."""


class Backend(Protocol):
    """Anything that answers chats: ``complete(messages_list, params) -> list[str]``.

    A request that fails for good comes back as a :class:`RequestError` instance in its slot
    (like ``asyncio.gather(return_exceptions=True)``), so one bad request does not sink a batch.
    """

    model: str
    usage: Usage

    def complete(
        self, messages_list: Sequence[Messages], params: Mapping[str, Any]
    ) -> list[str | RequestError]: ...


class RateLimiter:
    """Spaces request starts evenly so that at most ``rpm`` start in any minute."""

    def __init__(self, rpm: float | None):
        self._interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Blocks until the next request may start."""
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


def retry_after_seconds(value: str | None) -> float | None:
    """Parses a ``Retry-After`` header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Turns a redirect into an HTTPError: the Authorization header must not follow it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _error_status(err: urllib.error.HTTPError) -> str:
    """``HTTP <code>`` plus the error object's ``type`` / ``code`` identifiers; never the body."""
    try:
        body = json.loads(err.read(4096))
        found = body.get("error", body) if isinstance(body, dict) else {}
        ids = [found.get(k) for k in ("type", "code")] if isinstance(found, dict) else []
    except (ValueError, OSError, http.client.HTTPException):
        ids = []
    ids = [str(i) for i in ids if isinstance(i, (str, int)) and _IDENTIFIER.fullmatch(str(i))]
    return f"HTTP {err.code}" + (f" ({', '.join(ids)})" if ids else "")


class OpenAIChatBackend:
    """A chat-completions client for ``{base_url}/chat/completions``; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        allow_http_key: bool = False,
        cache: RequestCache | None = None,
        concurrency: int = 8,
        rpm: float | None = None,
        max_retries: int = 6,
        timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        price_in: float = 0.0,
        price_out: float = 0.0,
        max_requests: int | None = None,
        progress: bool = True,
    ):
        keys.check_endpoint(base_url, key_env=api_key_env, allow_http_key=allow_http_key)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = keys.read_key(api_key_env) if api_key_env else None
        self._redact = keys.Redactor({api_key_env: self._api_key} if api_key_env else {})
        proxies = keys.proxies_for(base_url, key_env=api_key_env)
        self._opener = urllib.request.build_opener(
            _NoRedirects, urllib.request.ProxyHandler(proxies)
        )
        self.cache = cache
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_requests = max_requests
        self.progress = progress
        self.usage = Usage(price_in=price_in, price_out=price_out)
        self._limiter = RateLimiter(rpm)
        self._budget_lock = threading.Lock()
        self._budget_used = 0
        self._stop = threading.Event()

    def __repr__(self) -> str:
        key = f"key from ${self.api_key_env}" if self._api_key else "no key"
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r}, {key})"

    def complete(
        self, messages_list: Sequence[Messages], params: Mapping[str, Any]
    ) -> list[str | RequestError]:
        """Answers every chat; cached ones from the cache, the rest over HTTP in parallel."""
        results: list[str | RequestError | None] = [None] * len(messages_list)
        pending: dict[str, list[int]] = {}
        for i, messages in enumerate(messages_list):
            key = request_key(self.model, messages, params)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                results[i] = hit["content"]
                self.usage.add(cache_hits=1, **_cached_tokens(hit.get("usage")))
            else:
                pending.setdefault(key, []).append(i)
        keys = list(pending)
        with self._budget_lock:
            allowed = len(keys)
            if self.max_requests is not None:
                allowed = min(allowed, max(0, self.max_requests - self._budget_used))
            self._budget_used += allowed
        self._run(keys[:allowed], pending, messages_list, params, results)
        if allowed < len(keys):
            raise BudgetExhausted(
                f"stopped after --max_requests={self.max_requests} new requests to {self.model}; "
                "rerun the same command to continue from the cache"
            )
        return results  # type: ignore[return-value]

    def _run(self, keys, pending, messages_list, params, results) -> None:
        if not keys:
            return
        self._stop.clear()
        bar = tqdm(total=len(keys), desc=self.model, unit="req", disable=not self.progress)
        pool = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="clair")
        try:
            futures = {
                pool.submit(self._one, key, messages_list[pending[key][0]], params): key
                for key in keys
            }
            for fut in cf.as_completed(futures):
                result = fut.result()
                for i in pending[futures[fut]]:
                    results[i] = result
                bar.update(1)
        except BaseException:
            self._stop.set()  # workers waiting to retry give up instead of sleeping on
            raise
        finally:
            # On Ctrl-C: drop queued requests, let in-flight ones finish and reach the cache.
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _one(self, key: str, messages: Messages, params: Mapping[str, Any]) -> str | RequestError:
        body = {**params, "model": self.model, "messages": messages}
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            try:
                reply = self._post(body)
            except _Retry as err:
                if attempt == self.max_retries:
                    self.usage.add(failed=1)
                    return RequestError(
                        self._redact.text(f"gave up after {attempt + 1} attempts: {err}")
                    )
                self.usage.add(retries=1)
                if self._stop.wait(self._delay(attempt, err.wait)):
                    return RequestError("cancelled")
            except RequestError as err:
                self.usage.add(failed=1)
                return RequestError(self._redact.text(str(err)))
            else:
                reply = self._redact(reply)
                usage = reply.get("usage") or {}
                self.usage.add(
                    completed=1,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
                if self.cache is not None:
                    self.cache.put(key, reply)
                return reply["content"]
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        cap = min(self.backoff_max, self.backoff_base * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter"

    def _post(self, body: Mapping[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        self.usage.add(http_requests=1)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            status = _error_status(err)
            err.close()
            if err.code in RETRYABLE_STATUS:
                raise _Retry(status, retry_after_seconds(err.headers.get("Retry-After"))) from None
            if 300 <= err.code < 400:
                status += " (a redirect; not followed: give the final URL)"
            raise RequestError(status) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise _Retry(f"connection error: {type(err).__name__}: {err}") from None
        return _parse_reply(raw)


def _parse_reply(raw: bytes) -> dict[str, Any]:
    """The cache entry of a 200 reply; a malformed one is retried (servers do glitch)."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        content = choice["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("content is not a string")
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _Retry(f"malformed reply ({type(err).__name__}: {err})") from None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return {
        "model": data.get("model"),
        "content": content,
        "finish_reason": choice.get("finish_reason"),
        "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")},
    }


def _cached_tokens(usage: Mapping[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {
        "cached_prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "cached_completion_tokens": int(usage.get("completion_tokens") or 0),
    }
