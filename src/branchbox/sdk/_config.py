"""Connection settings. Precedence: per call > client (Sandbox.create/connect args) > env > default.

Environment: ``BRANCHBOX_URL`` (default http://127.0.0.1:7077), ``BRANCHBOX_API_KEY`` (default none),
``BRANCHBOX_REQUEST_TIMEOUT`` (seconds, default 60; ``0`` or ``none`` means no limit).
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "http://127.0.0.1:7077"
DEFAULT_REQUEST_TIMEOUT = 60.0


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """One TLS context per process: building one (loading CA certificates) costs tens of ms per client."""
    return ssl.create_default_context()


class _Unset:
    """Marker for 'not given' where None is a meaningful value (no timeout)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


def _env_timeout(env: Mapping[str, str]) -> float | None:
    raw = env.get("BRANCHBOX_REQUEST_TIMEOUT")
    if raw is None or not raw.strip():
        return DEFAULT_REQUEST_TIMEOUT
    if raw.strip().lower() in ("0", "none"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"BRANCHBOX_REQUEST_TIMEOUT={raw!r} is not a number of seconds") from None


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    base_url: str
    api_key: str | None
    request_timeout: float | None  # seconds for one HTTP request; None: no limit

    @classmethod
    def resolve(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: float | _Unset | None = UNSET,
        env: Mapping[str, str] | None = None,
    ) -> ConnectionConfig:
        """Fill what was not given from the environment, then from defaults."""
        env = os.environ if env is None else env
        url = base_url or env.get("BRANCHBOX_URL") or DEFAULT_URL
        key = api_key if api_key is not None else (env.get("BRANCHBOX_API_KEY") or None)
        timeout = _env_timeout(env) if isinstance(request_timeout, _Unset) else request_timeout
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base url {url!r} must look like http://host:port (set base_url= or BRANCHBOX_URL)")
        return cls(base_url=url.rstrip("/"), api_key=key, request_timeout=timeout)

    def with_timeout(self, request_timeout: float | _Unset | None) -> ConnectionConfig:
        """Per-call override (UNSET keeps this config's value)."""
        if isinstance(request_timeout, _Unset):
            return self
        return replace(self, request_timeout=request_timeout)

    def headers(self) -> dict[str, str]:
        h = {"user-agent": "branchbox-sdk/0.1"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def ws_url(self, path: str, **query: str) -> str:
        """ws:// or wss:// URL of an API path."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, qs, ""))
