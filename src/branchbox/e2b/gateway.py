"""The E2B facade as one pure ASGI middleware on the daemon's own port.

Why the daemon's port and root paths: the SDK needs one address for ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` and
builds signed file URLs as ``<sandbox url>/files?...`` with no sandbox in them; a second port would be a second
thing to configure, open and secure. Nothing collides with branchbox's own routes:

* a request carrying ``E2b-Sandbox-Id`` is envd's data plane (``/health``, ``/files``, ``/process.Process/*``,
  ``/filesystem.Filesystem/*``), checked against that sandbox's ``X-Access-Token``;
* ``/sandboxes...``, ``/v2/sandboxes...``, ``/snapshots`` and ``/templates...`` are E2B's control plane
  (branchbox's API lives under ``/v1``);
* ``GET|POST /files?...&signature=...`` without the header is a signed URL: the sandbox whose token made the
  signature is the one it opens;
* everything else (``/health`` without the header, ``/v1/...``) goes on to branchbox's app unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from branchbox.e2b import connect, control, files
from branchbox.e2b.connect import RpcError
from branchbox.e2b.filesystem import FilesystemService
from branchbox.e2b.process import ProcessService
from branchbox.e2b.state import E2BState, basic_user, resolve_path
from branchbox.e2b.tokens import file_signature
from branchbox.e2b.watch import WatchService
from branchbox.errors import BranchboxError
from branchbox.models import SandboxInfo, SandboxState

MAX_BODY = 1024 * 1024  # a control-plane or RPC request body
_SANDBOX_HEADER = b"e2b-sandbox-id"


@dataclass(frozen=True, slots=True)
class RouteName:
    path: str  # what the access log and the latency histogram name the request by


class E2BGateway:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._state: E2BState | None = None

    def state(self, scope: Scope) -> E2BState:
        if self._state is None:  # the app's context (branchbox.api.context.AppContext), made by create_app
            ctx = scope["app"].state.ctx
            self._state = E2BState.of(ctx.manager, ctx.checker.check)
        return self._state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        sid = None
        for k, v in scope["headers"]:
            if k == _SANDBOX_HEADER:
                sid = v.decode("latin-1")
                break
        if sid is not None:
            await self._data_plane(self.state(scope), sid, scope, receive, send)
        elif path.startswith(control.PREFIXES):
            scope["route"] = RouteName("/e2b" + _template(path))
            state = self.state(scope)
            try:
                body = await _read(receive)
            except RpcError as exc:
                await _json(send, 413, {"code": 413, "message": exc.message})
                return
            reply = await control.handle(state, scope["method"], path, _qs(scope), _headers(scope), body)
            await _json(send, reply.status, reply.body, reply.headers)
        elif path == "/files" and b"signature=" in scope.get("query_string", b""):
            scope["route"] = RouteName("/e2b/files (signed)")
            await self._signed_files(self.state(scope), scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- data plane ------------------------------------------------------------------------------
    async def _data_plane(self, state: E2BState, sid: str, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        scope["route"] = RouteName("/e2b/envd" + (path if path.count("/") <= 2 else "/?"))
        headers = _headers(scope)
        rpc = path.startswith(("/process.Process/", "/filesystem.Filesystem/"))
        if not state.tokens.check(sid, headers.get("x-access-token")):
            await _envd_error(send, rpc, headers, RpcError("unauthenticated", "invalid or missing X-Access-Token"), 401)
            return
        info = await _awake(state, sid)
        if info is None or info.state is not SandboxState.RUNNING:  # what E2B's proxy answers for a sandbox that is
            message = f"The sandbox {sid} was not found"  # gone (or paused)
            await _envd_error(send, rpc, headers, RpcError("unavailable", message), 502, sandbox=sid)
            return
        user = basic_user(headers.get("authorization")) or state.default_user(info.template_digest)
        if path == "/health":
            await _json(send, 204, None)
        elif path == "/files":
            await self._files(state, sid, scope, receive, send, dict(parse_qsl(_qs(scope))), user)
        elif rpc:
            await self._rpc(state, sid, path, scope, receive, send, headers, user)
        else:
            await _json(send, 404, {"code": 404, "message": f"envd has no route {path}"})

    async def _files(
        self, state: E2BState, sid: str, scope: Scope, receive: Receive, send: Send, query: dict[str, str],
        user: str | None,
    ) -> None:  # fmt: skip
        user = files.read_user(query, user)
        try:
            if scope["method"] == "GET":
                first, rest = await files.download(state, sid, resolve_path(files.required_path(query), user))
                await _stream(scope, receive, send, 200, [(b"content-type", b"application/octet-stream")],
                              _bytes(first, rest))  # fmt: skip
            elif scope["method"] == "POST":
                await _json(send, 200, await files.upload(state, sid, scope, receive, send, query, user))
            else:
                await _json(send, 405, {"code": 405, "message": "/files takes GET and POST"})
        except files.FilesError as exc:
            await _json(send, exc.status, {"code": exc.status, "message": exc.message})

    async def _signed_files(self, state: E2BState, scope: Scope, receive: Receive, send: Send) -> None:
        query = dict(parse_qsl(_qs(scope)))
        operation = {"GET": "read", "POST": "write"}.get(scope["method"])
        path, signature = query.get("path", ""), query.get("signature", "")
        expiration = query.get("signature_expiration")
        if operation is None or not path:
            await _json(send, 400, {"code": 400, "message": "a signed URL is GET (read) or POST (write) with path="})
            return
        if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
            await _json(send, 401, {"code": 401, "message": "the signed URL has expired: sign a new one"})
            return
        user = query.get("username", "")
        exp = None if expiration is None else int(expiration)
        for info in await state.manager.list(states={SandboxState.RUNNING, SandboxState.PAUSED}):
            if info.state is SandboxState.PAUSED and not info.lifecycle.auto_resume:
                continue
            token = state.tokens.token(info.id)
            if file_signature(path, operation, user, token, exp) == signature:
                awake = await _awake(state, info.id)  # a paused sandbox with auto_resume wakes for it
                if awake is None or awake.state is not SandboxState.RUNNING:
                    await _json(send, 502, {"code": 502, "message": f"The sandbox {info.id} was not found"})
                    return
                default = state.default_user(info.template_digest)
                await self._files(state, info.id, scope, receive, send, query, user or default)
                return
        await _json(send, 401, {"code": 401, "message": "the URL's signature matches no running sandbox"})

    async def _rpc(
        self, state: E2BState, sid: str, path: str, scope: Scope, receive: Receive, send: Send,
        headers: dict[str, str], user: str | None,
    ) -> None:  # fmt: skip
        streaming = headers.get("content-type", "").startswith(connect.STREAM_JSON)
        if streaming and path == "/process.Process/StreamInput":  # client streaming: input as it comes
            await _client_stream(send, ProcessService(state).stream_input(
                sid, connect.stream_messages(receive, headers.get("connect-content-encoding"))))  # fmt: skip
            return
        try:
            connect.check_method(scope["method"])
            deadline_s = connect.timeout_s(headers.get("connect-timeout-ms"))
            body = await _read(receive, connect.MAX_MESSAGE)
            encoding = headers.get("connect-content-encoding" if streaming else "content-encoding")
            req = connect.stream_request(body, encoding) if streaming else connect.unary_request(body, encoding)
        except RpcError as exc:
            await _envd_error(send, streaming, headers, exc, connect.STATUS[exc.code])
            return
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        procs, fs, watch = ProcessService(state), FilesystemService(state), WatchService(state)
        if streaming:
            keepalive = _keepalive(headers.get("keepalive-ping-interval"))
            streams: dict[str, Callable[[], AsyncIterator[dict[str, Any]]]] = {
                "/process.Process/Start": lambda: procs.start(sid, req, user, deadline, keepalive),
                "/process.Process/Connect": lambda: procs.connect(sid, req, deadline, keepalive),
                "/filesystem.Filesystem/WatchDir": lambda: watch.watch_dir(sid, req, user, deadline, keepalive),
            }
            make = streams.get(path)
            if make is None:
                await _envd_error(send, True, headers, RpcError("unimplemented", f"{path} is not served"), 501)
                return
            await _stream(scope, receive, send, 200, [(b"content-type", connect.STREAM_JSON.encode())],
                          _enveloped(make()))  # fmt: skip
            return
        unary: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "/process.Process/List": lambda: procs.list(sid, req),
            "/process.Process/SendInput": lambda: procs.send_input(sid, req),
            "/process.Process/SendSignal": lambda: procs.send_signal(sid, req),
            "/process.Process/CloseStdin": lambda: procs.close_stdin(sid, req),
            "/process.Process/Update": lambda: procs.update(sid, req),
            "/filesystem.Filesystem/Stat": lambda: fs.stat(sid, req, user),
            "/filesystem.Filesystem/ListDir": lambda: fs.list_dir(sid, req, user),
            "/filesystem.Filesystem/MakeDir": lambda: fs.make_dir(sid, req, user),
            "/filesystem.Filesystem/Remove": lambda: fs.remove(sid, req, user),
            "/filesystem.Filesystem/Move": lambda: fs.move(sid, req, user),
            "/filesystem.Filesystem/CreateWatcher": lambda: watch.create(sid, req, user),
            "/filesystem.Filesystem/GetWatcherEvents": lambda: watch.events(sid, req),
            "/filesystem.Filesystem/RemoveWatcher": lambda: watch.remove(sid, req),
        }
        call = unary.get(path, lambda: _unimplemented(path))
        try:
            answer = await call()
        except RpcError as exc:
            await _envd_error(send, False, headers, exc, connect.STATUS[exc.code])
            return
        await _json(send, 200, answer)


async def _unimplemented(path: str) -> dict[str, Any]:
    raise RpcError("unimplemented", f"{path} is not served by this facade (see docs/e2b.md)")


def _keepalive(value: str | None) -> float | None:
    if value and value.isdigit() and 0 < int(value) <= 3600:
        return float(value)
    return None


async def _enveloped(messages: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for m in messages:
            yield connect.envelope(m)
    except RpcError as exc:
        yield connect.end_stream(exc)
        return
    except BranchboxError as exc:
        yield connect.end_stream(connect.from_branchbox(exc))
        return
    yield connect.end_stream()


async def _client_stream(send: Send, call: Awaitable[dict[str, Any]]) -> None:
    try:
        body = connect.envelope(await call) + connect.end_stream()
    except RpcError as exc:
        body = connect.end_stream(exc)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", connect.STREAM_JSON.encode()),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _bytes(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _awake(state: E2BState, sid: str) -> SandboxInfo | None:
    """The sandbox a data-plane request names (None: unknown), resumed first by the Manager when it is paused with
    ``auto_resume`` (E2B's auto-resume on traffic; ``Manager.awake``, as for every other front)."""
    with contextlib.suppress(BranchboxError):  # not running afterwards: the caller answers from its state
        await state.manager.awake(sid)
    try:
        return await state.manager.get(sid)
    except BranchboxError:
        return None


def _template(path: str) -> str:
    parts = path.strip("/").split("/")
    start = 2 if parts and parts[0] == "v2" else 1
    if len(parts) > start:
        parts[start] = "{id}"
    return "/" + "/".join(parts)


def _qs(scope: Scope) -> str:
    raw: bytes = scope.get("query_string", b"")
    return raw.decode("latin-1")


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _read(receive: Receive, limit: int = MAX_BODY) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RpcError("resource_exhausted", f"the request body is over {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    hdrs = [(b"content-type", b"application/json")] if body is not None else []
    hdrs.append((b"content-length", str(len(raw)).encode()))
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


async def _envd_error(
    send: Send, streaming: bool, headers: dict[str, str], exc: RpcError, status: int, sandbox: str | None = None
) -> None:
    """An error before any answer: as a Connect end-of-stream for a streaming call, else a JSON body that both the
    Connect clients (``code`` as a string) and envd's HTTP clients (``message``) read."""
    if streaming and headers.get("content-type", "").startswith(connect.STREAM_JSON):
        body = connect.end_stream(exc)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", connect.STREAM_JSON.encode()),
                                (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
        return
    body_: dict[str, Any] = exc.body() if headers.get("content-type", "").startswith(connect.JSON) else {
        "code": status, "message": exc.message}  # fmt: skip
    if sandbox is not None:
        body_["sandboxId"] = sandbox
    await _json(send, status, body_)


async def _stream(
    scope: Scope, receive: Receive, send: Send, status: int, headers: list[tuple[bytes, bytes]],
    chunks: AsyncIterator[bytes],
) -> None:  # fmt: skip
    """Send ``chunks`` as the body; a client that goes away cancels the producer (whose ``finally`` runs in plain
    asyncio, so it may still await: a process stream detaches its handle there)."""
    await send({"type": "http.response.start", "status": status, "headers": headers})

    async def produce() -> None:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    producer = asyncio.ensure_future(produce())
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not producer.done():
            producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await producer
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if producer.done() and not producer.cancelled() and producer.exception() is not None:
        raise producer.exception()  # type: ignore[misc]
