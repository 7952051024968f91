"""The port proxy: a request to host ``{port}-{id}.{port_domain}`` (default ``localhost``: browsers resolve
``*.localhost`` to loopback; any path, any method, and WebSocket) reaches that path on port ``{port}`` of the
sandbox, over its veth (the daemon's host reaches every sandbox; sandboxes never reach the host). Each port of
each sandbox is so a browser origin of its own, apart from the API's. ``/v1/sandboxes/{id}/ports/{port}/{path}``
on the API's host does the same for clients that cannot resolve those names (``get_host``); its responses carry
``Content-Security-Policy: sandbox`` (no ``allow-same-origin``), so a page shown from there runs in an opaque
origin, not the API's. A pure ASGI middleware: bodies are streamed both ways, nothing is buffered.

Auth: the daemon's API key (``Authorization: Bearer``; not forwarded to the sandbox), or the sandbox's port
token (``X-Branchbox-Token`` header, ``?bb_token=`` query parameter, or on a port's host the ``bb_token``
cookie that a valid ``?bb_token=`` sets; removed before forwarding; any ``Authorization`` header then belongs to
the sandbox's app and is forwarded). A daemon on loopback without keys needs neither (its ports are public to
the host's users, as a dev server on localhost is); a daemon that requires keys requires one of them.

A server in a container sandbox may listen on 0.0.0.0, its eth0 address or 127.0.0.1 (a dev server's default):
when its address refuses, the proxy connects again through a socket made in the sandbox's network namespace,
whose 127.0.0.1 is the sandbox's. A microVM's loopback is in its guest: its servers need 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from branchbox.api.context import AppContext
from branchbox.api.fastpath import RouteName
from branchbox.api.guard import Guard
from branchbox.api.port_relay import HOP, UpstreamError, relay
from branchbox.api.responses import error_json
from branchbox.errors import BadRequestError, BranchboxError, PortUnreachableError, TimeoutError_, UnauthorizedError

if TYPE_CHECKING:
    from fastapi import FastAPI

_PORTS = re.compile(r"^/v1/sandboxes/([^/]+)/ports/(\d{1,5})(/.*)?$")
ROUTE = RouteName("/v1/sandboxes/{sandbox_id}/ports/{port}/{path}")
TOKEN_HEADER = b"x-branchbox-token"
TOKEN_PARAM = "bb_token"  # noqa: S105 - the name of a query parameter, not a secret
TOKEN_COOKIE = b"bb_token"
SANDBOX_CSP = b"sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads allow-pointer-lock"
_WS_SKIP = HOP | {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                   b"sec-websocket-protocol", b"host"}  # fmt: skip
CONNECT_TIMEOUT_S = 10.0
# a WebSocket's closing handshake with the upstream, bounded in relay_websocket (for the port proxy and the fleet
# controller alike): one that stopped reading (a sandbox's server whose echoes are stuck behind a client that went
# away) cannot answer, and its connection is dropped after this long
WS_CLOSE_TIMEOUT_S = 2.0
LOOPBACK = "127.0.0.1"


class Upstream:
    """Where a proxied request goes: the sandbox's address, or (refused there) its own 127.0.0.1 through a socket
    made in its network namespace, where the backend can make one (containers; not microVMs)."""

    def __init__(self, ctx: AppContext, sandbox_id: str, address: str, port: int) -> None:
        self.ctx, self.sandbox_id, self.address, self.port = ctx, sandbox_id, address, port
        self.host = address  # the address connected to (the Host header's fallback)
        self.tried_loopback = False

    async def open(self) -> socket.socket:
        """A connected socket to the port (within the connect timeout): on the sandbox's address, or on its own
        127.0.0.1 when the address refuses (a dev server's default binding)."""
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await _connect(sock, self.address, self.port)
            except ConnectionRefusedError:
                inner = await self._loopback()
                if inner is None:
                    raise
                await _connect(inner, LOOPBACK, self.port)
                self.host = LOOPBACK
                return inner
            return sock

    async def _loopback(self) -> socket.socket | None:
        try:
            sock = await self.ctx.manager.loopback_socket(self.sandbox_id)
        except BranchboxError:  # e.g. paused meanwhile: the first answer (refused) stands
            return None
        self.tried_loopback = sock is not None
        return sock

    def unreachable(self, exc: BaseException) -> BranchboxError:
        port, sid = self.port, self.sandbox_id
        if isinstance(exc, TimeoutError):
            return TimeoutError_(f"port {port} of sandbox {sid} did not accept in time")
        if self.tried_loopback:
            where = "on its address or on 127.0.0.1: start a server there"
        else:
            where = "start a server there that listens on 0.0.0.0 (a microVM's 127.0.0.1 is out of reach)"
        return PortUnreachableError(f"nothing accepts connections on port {port} of sandbox {sid}: {where}")


async def _connect(sock: socket.socket, host: str, port: int) -> None:
    """Connect a non-blocking ``sock``; closed when that fails."""
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise


class PortProxy:
    def __init__(self, app: ASGIApp, fastapi: FastAPI, guard: Guard) -> None:
        self.app = app
        self.fastapi = fastapi
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        target = self.guard.port_target(host)
        raw_path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if target is not None:  # {port}-{id}.<domain>: the sandbox's own origin, every path is the sandbox's
            port, sandbox_id = target
            path, by_host = raw_path, True
        else:
            m = _PORTS.match(scope["path"])
            if m is None:
                await self.app(scope, receive, send)
                return
            raw = _PORTS.match(raw_path)
            sandbox_id, port = m.group(1), int(m.group(2))
            path, by_host = (raw or m).group(3) or "/", False  # as the client sent it: %2F stays encoded
            send = _sandboxed(send)  # under the API's origin: the page gets an opaque origin of its own
        scope["route"] = ROUTE
        ctx: AppContext = self.fastapi.state.ctx
        try:
            headers, query, cookie = _authorize(ctx, scope, sandbox_id, by_host=by_host)
            if not 0 < port < 65536:
                raise BadRequestError(f"port {port} is out of range: use 1-65535")
            await ctx.manager.awake(sandbox_id)  # paused with auto_resume: traffic wakes it; else a clear 409
            address = (await ctx.manager.get_network(sandbox_id)).address
        except BranchboxError as exc:
            ctx.metrics.count_api_error(exc.code)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
            else:
                await _error(send, exc)
            return
        target = path + (f"?{query}" if query else "")
        upstream = Upstream(ctx, sandbox_id, address, port)
        if cookie is not None:
            send = _with_cookie(send, cookie)
        if scope["type"] == "websocket":
            await self._websocket(ctx, upstream, target, headers, scope, receive, send)
        else:
            await self._http(ctx, upstream, target, headers, scope, receive, send)

    async def _http(
        self,
        ctx: AppContext,
        up: Upstream,
        target: str,
        headers: list[tuple[bytes, bytes]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        # a body only when the request has one: an empty chunked body would be left unread by simple servers,
        # whose close() then resets the connection under the response
        lengths = [v.strip() for k, v in headers if k.lower() == b"content-length"]
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in headers)
        body = _body(receive) if chunked or any(n != b"0" for n in lengths) else None
        method, port = scope["method"], up.port
        try:
            sock = await up.open()
            await relay(
                up.host, port, method, target, headers, body, send, connect_timeout=CONNECT_TIMEOUT_S, sock=sock
            )
        except (OSError, TimeoutError) as exc:
            err = up.unreachable(exc)
            ctx.metrics.count_api_error(err.code)
            await _error(send, err)
        except UpstreamError as exc:
            ctx.metrics.count_api_error("port_unreachable")
            if exc.started:  # abort the client's connection: a truncated body must not look complete
                ctx.log.warning("port.proxy_broken", port=port, error=str(exc))
                raise
            await _error(send, PortUnreachableError(f"port {port} of sandbox {up.sandbox_id}: {exc}"))

    async def _websocket(
        self,
        ctx: AppContext,
        up: Upstream,
        target: str,
        headers: list[tuple[bytes, bytes]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        extra = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k.lower() not in _WS_SKIP]
        opts: dict[str, Any] = {
            "additional_headers": extra,
            "subprotocols": scope.get("subprotocols") or None,
            "open_timeout": CONNECT_TIMEOUT_S,
            "max_size": ctx.settings.max_ws_message_bytes,  # bigger: closed with 1009 (message too big)
            "compression": None,
            "proxy": None,
        }
        uri = f"ws://{up.address}:{up.port}{target}"
        try:
            upstream = await connect(uri, sock=await up.open(), **opts)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            code = 4004 if isinstance(exc, InvalidStatus) else 1011
            ctx.metrics.count_api_error("port_unreachable")
            await send({"type": "websocket.close", "code": code, "reason": f"sandbox port: {exc}"[:120]})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        await relay_websocket(upstream, receive, send)


async def relay_websocket(upstream: ClientConnection, receive: Receive, send: Send) -> None:
    """Relay WebSocket messages both ways between an accepted ASGI WebSocket and a connected upstream until either
    side closes (the port proxy and the fleet controller both use it)."""

    async def client_to_upstream() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                await upstream.close()
                return
            if msg.get("bytes") is not None:
                await upstream.send(msg["bytes"])
            elif msg.get("text") is not None:
                await upstream.send(msg["text"])

    async def upstream_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, bytes):
                    await send({"type": "websocket.send", "bytes": data})
                else:
                    await send({"type": "websocket.send", "text": data})
        except ConnectionClosed:
            pass
        code = upstream.close_code or 1000
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # a closing handshake, bounded: websockets waits for a full write buffer to drain before its own timeout
            async with asyncio.timeout(WS_CLOSE_TIMEOUT_S):
                await upstream.close()
        except TimeoutError:
            upstream.transport.abort()


def _authorize(
    ctx: AppContext, scope: Scope, sandbox_id: str, *, by_host: bool
) -> tuple[list[tuple[bytes, bytes]], str, str | None]:
    """Check the caller; return the headers and query string to forward (daemon credentials removed), and the
    token to set as a cookie (a sandbox port's host given a valid ``?bb_token=``: its page's next requests,
    which carry no query, then carry the cookie)."""
    raw_query = scope.get("query_string", b"").decode("latin-1")
    params = parse_qsl(raw_query, keep_blank_values=True)
    token = next((v for k, v in params if k == TOKEN_PARAM), None)
    from_query = token is not None
    headers: list[tuple[bytes, bytes]] = []
    authorization: str | None = None
    for k, v in scope["headers"]:
        if k == TOKEN_HEADER:
            token, from_query = v.decode("latin-1"), False
            continue
        if k == b"authorization":
            authorization = v.decode("latin-1")
        if k == b"cookie" and by_host:
            kept, found = _split_cookie(v)
            token = token if token is not None or found is None else found
            if kept:
                headers.append((k, kept))
            continue
        headers.append((k, v))
    query = urlencode([(k, v) for k, v in params if k != TOKEN_PARAM]) if from_query else raw_query
    if token is not None:
        if not ctx.port_tokens.check(sandbox_id, token):
            raise UnauthorizedError(
                "invalid port token: get the current one from GET /v1/sandboxes/{id}/network (port_token)"
            )
        return headers, query, token if by_host and from_query else None
    ctx.checker.check(authorization)
    if ctx.checker.is_api_key(authorization):
        headers = [(k, v) for k, v in headers if k != b"authorization"]
    return headers, query, None


def _split_cookie(value: bytes) -> tuple[bytes, str | None]:
    """A Cookie header without the port token's cookie, and that token (None if absent)."""
    kept: list[bytes] = []
    token = None
    for part in value.split(b";"):
        name, _, val = part.strip().partition(b"=")
        if name == TOKEN_COOKIE:
            token = val.decode("latin-1")
        elif part.strip():
            kept.append(part.strip())
    return b"; ".join(kept), token


def _with_cookie(send: Send, token: str) -> Send:
    """``send`` that sets the port token as a cookie of this host only (HttpOnly, SameSite=Lax)."""
    cookie = TOKEN_COOKIE + b"=" + token.encode("latin-1") + b"; Path=/; HttpOnly; SameSite=Lax"

    async def wrapped(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", cookie)]}
        await send(msg)

    return wrapped


def _sandboxed(send: Send) -> Send:
    """``send`` that adds ``Content-Security-Policy: sandbox`` (without allow-same-origin) to the response: a page
    served under the API's own origin runs in an opaque origin, so its requests to the API carry
    ``Origin: null`` and are refused (:mod:`branchbox.api.guard`), and it reads nothing of the API's."""

    async def wrapped(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), (b"content-security-policy", SANDBOX_CSP)]}
        await send(msg)

    return wrapped


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        chunk = msg.get("body", b"")
        if chunk:
            yield chunk
        if not msg.get("more_body", False):
            return


async def _error(send: Send, exc: BranchboxError) -> None:
    body = error_json(exc.code, exc.message, exc.details or None)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
