# Generated from _async_http.py by scripts/gen_sync.py (unasync): edit _async_http.py, then run `make sdk`.
"""A sandbox object's connections to its daemon: pooled keep-alive connections for small JSON requests, an httpx
client for streams and queries, WebSockets for streamed output and terminals; ``_oneshot`` for daemon-wide
requests.

Written once, for both flavours: ``scripts/gen_sync.py`` generates its sync twin (``_sync*.py``, unasync);
never edit the twin by hand.

``timeout=`` parameters are the command's or the sandbox's lifetime (E2B naming), not a deadline of the call
itself, hence the ASYNC109 exemptions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import httpx
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import branchbox.sdk._requests as rq
import branchbox.sdk._wire as _wire
from branchbox.sdk._config import UNSET, ConnectionConfig, _Unset, default_ssl_context
from branchbox.sdk._errors import ConnectionError_, TimeoutException
from branchbox.sdk._wire import Reply

Timeout = float | None | _Unset


class _Http:
    """Per sandbox object: pooled keep-alive connections to its daemon for small JSON requests
    (:mod:`branchbox.sdk._wire`) and its own httpx client, made on first use, for streams and queries."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.wire: _wire.Wire | None = _wire.acquire(config)
        self._client: httpx.Client | None = None
        self._closed = False

    @property
    def client(self) -> httpx.Client:
        """The httpx client, made on first use (most sandbox objects never stream)."""
        if self._closed:
            raise RuntimeError("this sandbox object was closed: connect again with Sandbox.connect()")
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.config.base_url,
                headers=self.config.headers(),
                timeout=self.config.request_timeout,
                verify=default_ssl_context(),
            )
        return self._client

    def _timeout(self, req: rq.Req, request_timeout: Timeout) -> float | None:
        if not req.use_default_timeout:
            return req.timeout
        return self.config.with_timeout(request_timeout).request_timeout

    def send(self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Any = None) -> httpx.Response | Reply:
        try:
            if content is None and not req.params and not self._closed:
                assert self.wire is not None
                body = None if req.json is None else json.dumps(req.json, separators=(",", ":")).encode("utf-8")
                resp: httpx.Response | Reply = self.wire.request(
                    req.method, req.path, body, self._timeout(req, request_timeout)
                )
            else:
                resp = self.client.request(
                    req.method,
                    req.path,
                    params=req.params or None,
                    json=req.json,
                    content=content,
                    timeout=self._timeout(req, request_timeout),
                )
        except httpx.TimeoutException as exc:
            raise TimeoutException(
                f"{req.method} {req.path} timed out: pass request_timeout= or set BRANCHBOX_REQUEST_TIMEOUT",
                code="timeout",
            ) from exc
        except httpx.TransportError as exc:
            raise ConnectionError_(
                f"cannot reach the branchbox daemon at {self.config.base_url} ({exc}): is `branchbox serve` "
                "running? set BRANCHBOX_URL or base_url=",
                code="connection_error",
            ) from exc
        rq.raise_for_status(resp.status_code, resp.content)
        return resp

    @contextmanager
    def stream(self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Any = None) -> Iterator[httpx.Response]:
        try:
            with self.client.stream(
                req.method,
                req.path,
                params=req.params or None,
                content=content,
                json=req.json,
                timeout=self._timeout(req, request_timeout),
            ) as resp:
                if resp.status_code >= 400:
                    rq.raise_for_status(resp.status_code, resp.read())
                yield resp
        except httpx.TimeoutException as exc:
            raise TimeoutException(f"{req.method} {req.path} timed out: pass request_timeout=", code="timeout") from exc
        except httpx.TransportError as exc:
            raise ConnectionError_(
                f"connection to {self.config.base_url} failed: {exc}", code="connection_error"
            ) from exc

    def ws(self, path: str, *, binary: bool, query: str = "") -> ClientConnection:
        """A WebSocket to an API path; ``query``: more of the query string, already encoded."""
        url = self.config.ws_url(path, encoding="base64" if binary else "text") + (f"&{query}" if query else "")
        try:
            ws = connect(
                url,
                additional_headers=self.config.headers(),
                open_timeout=self.config.request_timeout,
                max_size=None,
                compression=None,
                proxy=None,
            )
        except InvalidStatus as exc:
            rq.raise_for_status(exc.response.status_code, bytes(exc.response.body or b""))
            raise
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ConnectionError_(f"WebSocket to {url} failed: {exc}", code="connection_error") from exc
        return ws.__enter__()  # entered here: the caller owns it (a terminal's handle may outlive a block)

    def close(self) -> None:
        self._closed = True
        if self.wire is not None:
            _wire.release(self.config, self.wire)
            self.wire = None
        if self._client is not None:
            self._client.close()


def _oneshot(request: rq.Req, *, base_url: str | None, api_key: str | None, request_timeout: Timeout) -> Any:
    """One daemon-wide request (list, templates, pools, snapshots) on a connection of its own."""
    http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
    try:
        return http.send(request)
    finally:
        http.close()


class _Owner(Protocol):
    """What the parts of a sandbox object (``sbx.files``, ``sbx.pty``...) use of it: its id and its connections."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def _http(self) -> _Http: ...
