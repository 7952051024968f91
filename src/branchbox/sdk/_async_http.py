"""A sandbox object's connections to its daemon: pooled keep-alive HTTP/1.1 connections for every request
(:mod:`branchbox.sdk._awire`, streamed bodies and query strings included), WebSockets for streamed output and
terminals; ``_oneshot`` for daemon-wide requests.

Written once, for both flavours: ``scripts/gen_sync.py`` generates its sync twin (``_sync*.py``, unasync);
never edit the twin by hand.

``timeout=`` parameters are the command's or the sandbox's lifetime (E2B naming), not a deadline of the call
itself, hence the ASYNC109 exemptions.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import branchbox.sdk._awire as _awire
import branchbox.sdk._requests as rq
from branchbox.sdk._config import UNSET, ConnectionConfig, _Unset
from branchbox.sdk._errors import BadRequestError, ConnectionError_, TimeoutException
from branchbox.sdk._http1 import InvalidRequest, Reply, WireError, WireTimeout, query_string

if TYPE_CHECKING:  # websockets itself is imported on first use, by ws()
    from websockets.asyncio.client import ClientConnection

Timeout = float | None | _Unset
Content = bytes | AsyncIterable[bytes] | None


class _AsyncHttp:
    """Per sandbox object: its share of the pooled keep-alive connections to its daemon
    (:mod:`branchbox.sdk._awire`)."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.wire: _awire.AsyncWire | None = _awire.acquire(config)

    def _pool(self) -> _awire.AsyncWire:
        if self.wire is None:
            raise RuntimeError("this sandbox object was closed: connect again with AsyncSandbox.connect()")
        return self.wire

    def _timeout(self, req: rq.Req, request_timeout: Timeout) -> float | None:
        if not req.use_default_timeout:
            return req.timeout
        return self.config.with_timeout(request_timeout).request_timeout

    @staticmethod
    def _body(req: rq.Req) -> bytes | None:
        return None if req.json is None else json.dumps(req.json, separators=(",", ":")).encode("utf-8")

    def _failed(self, req: rq.Req, exc: WireError) -> Exception:
        if isinstance(exc, InvalidRequest):
            return BadRequestError(f"{req.method} {req.path}: {exc}", code="bad_request")
        if isinstance(exc, WireTimeout):
            return TimeoutException(
                f"{req.method} {req.path} timed out ({exc}): pass request_timeout= or set BRANCHBOX_REQUEST_TIMEOUT",
                code="timeout",
            )
        return ConnectionError_(
            f"cannot reach the branchbox daemon at {self.config.base_url} ({exc}): is `branchbox serve` "
            "running? set BRANCHBOX_URL or base_url=",
            code="connection_error",
        )

    async def send(self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Content = None) -> Reply:
        """One request and its whole answer; an error status raises the SDK's error for it."""
        wire = self._pool()
        try:
            resp = await wire.request(
                req.method,
                req.path,
                self._body(req),
                self._timeout(req, request_timeout),
                query=query_string(req.params),
                content=content,
            )
        except WireError as exc:
            raise self._failed(req, exc) from exc
        rq.raise_for_status(resp.status_code, resp.content)
        return resp

    @asynccontextmanager
    async def stream(
        self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Content = None
    ) -> AsyncIterator[_awire.AsyncStreamed]:
        """One request whose answer is read as it comes inside the block; an error status raises at once."""
        wire = self._pool()
        try:
            async with wire.stream(
                req.method,
                req.path,
                self._body(req),
                self._timeout(req, request_timeout),
                query=query_string(req.params),
                content=content,
            ) as resp:
                if resp.status_code >= 400:
                    rq.raise_for_status(resp.status_code, await resp.aread())
                yield resp
        except WireError as exc:
            raise self._failed(req, exc) from exc

    async def ws(self, path: str, *, binary: bool, query: str = "") -> ClientConnection:
        """A WebSocket to an API path; ``query``: more of the query string, already encoded. websockets is
        imported here, on first use: a program making no WebSocket (most CLI commands) does not load it."""
        from websockets.asyncio.client import connect  # noqa: PLC0415
        from websockets.exceptions import InvalidHandshake, InvalidStatus  # noqa: PLC0415

        url = self.config.ws_url(path, encoding="base64" if binary else "text") + (f"&{query}" if query else "")
        try:
            ws = await connect(
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
        return await ws.__aenter__()  # entered here: the caller owns it (a terminal's handle may outlive a block)

    async def aclose(self) -> None:
        if self.wire is not None:
            _awire.release(self.config, self.wire)
            self.wire = None


async def _oneshot(request: rq.Req, *, base_url: str | None, api_key: str | None, request_timeout: Timeout) -> Reply:
    """One daemon-wide request (list, templates, pools, snapshots) on the pooled connections."""
    http = _AsyncHttp(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
    try:
        return await http.send(request)
    finally:
        await http.aclose()


class _AsyncOwner(Protocol):
    """What the parts of a sandbox object (``sbx.files``, ``sbx.pty``...) use of it: its id and its connections."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def _http(self) -> _AsyncHttp: ...
