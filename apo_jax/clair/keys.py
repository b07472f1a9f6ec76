"""API keys of the CLAIR backends: where they come from, where they may go, and redaction.

A key is read only from the environment variable that a role's ``--<role>_api_key_env`` names
(there is no default variable), is sent only to that role's endpoint, in the ``Authorization``
header, and never over plain http to a host that is not loopback unless the user allows it.
A request that carries a key never goes through a proxy over plain http (``$http_proxy`` would
read the header): to a loopback endpoint it goes direct, to another host it is refused; over
https a proxy only tunnels the encrypted connection (CONNECT) and stays in use.
Everything the command writes or prints passes through a :class:`Redactor` that replaces every
configured key value, so a server that echoes the header cannot put the key on disk.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from apo_jax import errors


class ApiKeyError(errors.UserError):
    """An API key that is missing, or that would travel where it must not."""


def read_key(env_name: str) -> str:
    """Returns the key held by the environment variable ``env_name``.

    Raises:
      ApiKeyError: the variable is unset or empty.
    """
    value = os.environ.get(env_name, "")
    if not value:
        raise ApiKeyError(
            f"${env_name} is not set; export the key there, or drop the "
            "--<role>_api_key_env flag for an endpoint that needs no key"
        )
    return value


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (traffic that never leaves the machine)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, *, key_env: str | None, allow_http_key: bool = False) -> None:
    """Refuses an endpoint that is not http(s), or plain http carrying a key off this machine.

    Args:
      url: the endpoint's base URL.
      key_env: the variable whose key goes to this endpoint, or None when no key is sent.
      allow_http_key: allow a key over plain http to any host (a trusted private network).

    Raises:
      ApiKeyError: the URL is not http(s), or a key would cross the network unencrypted.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiKeyError(f"{url!r}: not an http(s) URL (e.g. http://localhost:8000/v1)")
    if (
        key_env
        and parts.scheme == "http"
        and not allow_http_key
        and not is_loopback(parts.hostname)
    ):
        raise ApiKeyError(
            f"refusing to send ${key_env} over plain http to {parts.hostname}: use "
            "https, or pass --allow_http_key on a trusted network"
        )
    proxies_for(url, key_env=key_env)


def proxies_for(url: str, *, key_env: str | None) -> dict[str, str]:
    """The proxy table (scheme -> proxy URL, for ``urllib.request.ProxyHandler``) of ``url``.

    The environment's proxies (``$http_proxy``, ``$https_proxy``, ``$no_proxy``) are used, except
    that a request carrying a key never goes through a proxy over plain http: to a loopback
    endpoint it goes direct ({}), to another host it is refused. Over https the proxy only sees
    a CONNECT to the host; the key travels inside the encrypted tunnel.

    Raises:
      ApiKeyError: a key would be handed to a proxy in clear text.
    """
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return {}
    if key_env and parts.scheme == "http":
        if is_loopback(parts.hostname or ""):
            return {}
        raise ApiKeyError(
            f"refusing to send ${key_env} to {parts.hostname} through the plain-http proxy "
            f"{_without_userinfo(proxy)} (from $http_proxy): use https, or add "
            f"{parts.hostname} to $no_proxy"
        )
    return {parts.scheme: proxy}


def _without_userinfo(proxy: str) -> str:
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class Redactor:
    """Replaces every configured secret value in strings, dicts and lists.

    Args:
      secrets: variable name -> value; each value becomes ``[redacted $NAME]``.
    """

    def __init__(self, secrets: Mapping[str, str] | None = None):
        items = [(name, value) for name, value in (secrets or {}).items() if value]
        # Longest first, so a key that contains another is replaced whole.
        self._items = sorted(items, key=lambda item: len(item[1]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._items)

    def text(self, text: str) -> str:
        """``text`` with every secret value replaced."""
        for name, value in self._items:
            if value in text:
                text = text.replace(value, f"[redacted ${name}]")
        return text

    def __call__(self, obj: Any) -> Any:
        """A copy of a JSON-like object with every secret value replaced in its strings."""
        if not self._items:
            return obj
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self(k): self(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self(v) for v in obj]
        return obj

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Redacts the message of a :class:`~apo_jax.errors.UserError` raised inside."""
        try:
            yield
        except errors.UserError as e:
            e.args = tuple(self(a) for a in e.args)
            raise
