"""Resumable request bookkeeping for CLAIR data: a JSONL response cache and usage counters.

Every finished request is appended, flushed and fsynced to the cache as soon as it completes,
keyed by a hash of (model, messages, parameters). A rerun after a crash or Ctrl-C reads the cache
back and sends only the requests that have no entry, so no request is repeated and no finished
one is lost. Failed requests are not cached: a rerun tries them again. The cache holds responses
and token counts only, never request headers; entries pass through the command's redactor, so
an API key a server echoes in a reply is not stored either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from apo_jax.clair.prompts import Messages


def request_key(
    model: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
) -> str:
    """Returns the cache key of a request: sha256 of canonical JSON of (model, messages, params)."""
    blob = json.dumps(
        {"model": model, "messages": list(messages), "params": dict(params)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    """Append-only JSONL cache of finished requests, safe to share between threads.

    A torn last line (the process died mid-write) is skipped on load and counted in
    ``corrupt_lines``; the next append starts on a fresh line.

    Args:
      path: the JSONL file (created with its directory when missing).
      redact: applied to every entry before it is stored (e.g. a ``keys.Redactor``).
    """

    def __init__(self, path: str | os.PathLike[str], redact: Callable[[Any], Any] | None = None):
        self.path = os.fspath(path)
        self._redact = redact or (lambda entry: entry)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self.corrupt_lines = 0
        self._needs_newline = False
        self._file = None  # opened by the first put(), so a run that fails early writes nothing
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            self._needs_newline = bool(data) and not data.endswith(b"\n")
            for line in data.splitlines():
                self._load_line(line)

    def _open(self) -> Any:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - see close()
            if self._needs_newline:  # after a torn last line
                self._file.write("\n")
        return self._file

    def _load_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            entry = json.loads(line)
            self._entries[entry["key"]] = entry
        except (ValueError, KeyError, TypeError):
            self.corrupt_lines += 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        """Returns the cached entry for ``key``, or None."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        """Appends ``entry`` under ``key`` and makes it durable before returning."""
        record = self._redact({"key": key, **entry})
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            f = self._open()
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self._entries[key] = record

    def close(self) -> None:
        """Closes the append handle."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Usage:
    """Request and token counters of one backend, with cost from prices per 1M tokens.

    ``prompt_tokens``/``completion_tokens`` count requests sent in this run; tokens of answers
    served from the cache are counted apart in ``cached_*`` so the cost of this run stays honest.
    """

    price_in: float = 0.0
    price_out: float = 0.0
    http_requests: int = 0
    completed: int = 0
    failed: int = 0
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Adds to counters by name, atomically."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def cost(self) -> float:
        """Cost of this run's tokens in the currency of the prices."""
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the counters and the cost."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name[0] != "_"}
        out["cost"] = round(self.cost, 6)
        return out


def user_turn(prompt: str) -> Messages:
    """The single-turn chat for ``prompt``."""
    return [{"role": "user", "content": prompt}]
