"""The hot routes without FastAPI's per-request machinery (middleware stack, dependency solving, routing through
every route, response re-validation): ``POST /v1/sandboxes``, ``GET /v1/sandboxes/{id}`` and a foreground
``POST /v1/sandboxes/{id}/commands``.

It runs in front of the whole Starlette stack (``_App.__call__``) and does its own timing and logging. It parses
the body with the same pydantic model as the FastAPI route, checks the API key the same way and runs the same
shared function. Whatever it does not handle the normal way (another route, not JSON, ``background=true``, a body
that fails validation, and what :meth:`Guard.plain` does not pass: browser headers, a foreign Host, a chunked
or large body) goes on to FastAPI with the body replayed, so error messages and the OpenAPI document stay
those of the FastAPI routes.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import structlog
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from branchbox.api.context import AppContext
from branchbox.api.guard import Guard
from branchbox.api.responses import error_json
from branchbox.api.routes_commands import run_foreground
from branchbox.api.routes_sandboxes import create, log_created
from branchbox.api.run_json import StreamedJson
from branchbox.api.schemas import CreateSandboxRequest, RunCommandRequest, SandboxResponse
from branchbox.errors import BranchboxError

if TYPE_CHECKING:
    from fastapi import FastAPI

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", bound=BaseModel | StreamedJson)  # what a hot route answers: a model, or a body in parts
_SANDBOX = re.compile(r"^/v1/sandboxes/([^/]+)$")
_COMMANDS = re.compile(r"^/v1/sandboxes/([^/]+)/commands$")
_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True, slots=True)
class RouteName:
    """What ``scope["route"]`` carries for the access log and the latency histogram."""

    path: str


_CREATE = RouteName("/v1/sandboxes")
_GET = RouteName("/v1/sandboxes/{sandbox_id}")
_RUN = RouteName("/v1/sandboxes/{sandbox_id}/commands")


@dataclass(frozen=True, slots=True)
class Hot:
    """A request for one of the hot routes, known from its method and path (the body is checked later)."""

    route: RouteName
    sandbox_id: str = ""


_HOT_CREATE = Hot(_CREATE)


def match(method: str, path: str) -> Hot | None:
    """The hot route of ``method`` and ``path`` (no query string), or None."""
    if method == "GET":
        m = _SANDBOX.match(path)
        return None if m is None else Hot(_GET, m.group(1))
    if method != "POST":
        return None
    if path == "/v1/sandboxes":
        return _HOT_CREATE
    m = _COMMANDS.match(path)
    return None if m is None else Hot(_RUN, m.group(1))


async def _respond(send: Send, status: int, body: bytes | StreamedJson) -> None:
    length = body.length if isinstance(body, StreamedJson) else len(body)
    headers = [*_JSON_HEADERS, (b"content-length", str(length).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if isinstance(body, StreamedJson):  # the server's send waits while the client does not read
        for part in body.parts():
            await send({"type": "http.response.body", "body": part, "more_body": True})
        body = b""
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            raise ConnectionAbortedError("client disconnected")
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


Headers = Iterable[tuple[bytes, bytes]]
Observe = Callable[[str, str, int, float], None]


class Answer(NamedTuple):
    """A hot request's response, and what to do once it is written (log lines: off the client's wait). A large
    run result's body comes in parts (:class:`StreamedJson`): write each when the transport takes more."""

    status: int
    body: bytes | StreamedJson
    after: Callable[[], None] | None = None


class FastPath:
    """Answers the hot routes directly; everything else (and anything unusual) goes to ``app``.

    :meth:`answer` is the transport-free core: the daemon's HTTP protocol (:mod:`branchbox.daemon.http_front`)
    calls it without building an ASGI request at all; :meth:`__call__` is the same as ASGI middleware (any other
    server, the tests' in-process client). ``observe(method, route, status, seconds)`` records each request
    answered here (``app`` records the others)."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, *, observe: Observe, guard: Guard) -> None:
        self.app = app
        self.fastapi = fastapi
        self.observe = observe
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = match(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if hot is None or not self.guard.plain(scope["headers"]):  # the app's guard answers what is unusual
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        t0 = time.perf_counter()
        body = b""
        if hot.route is not _GET:
            try:
                body = await _read_body(receive)
            except ConnectionAbortedError:
                return
        answer = await self.answer(hot, scope["headers"], body)
        if answer is None:
            await self.app(scope, _replay(body), send)
            return
        scope["route"] = hot.route
        await _respond(send, answer.status, answer.body)
        if answer.after is not None:
            answer.after()
        self.observe(scope["method"], hot.route.path, answer.status, time.perf_counter() - t0)

    async def answer(self, hot: Hot, headers: Headers, body: bytes) -> Answer | None:
        """The response to a hot request; None when it is not for the fast path after all (see :meth:`prepare`)."""
        job = self.prepare(hot, headers, body)
        return None if job is None else await job()

    def prepare(self, hot: Hot, headers: Headers, body: bytes) -> Callable[[], Awaitable[Answer]] | None:  # noqa: PLR0911
        """Check a hot request at once, without waiting: the call that answers it, or None when it is not for the
        fast path after all (not JSON, ``background=true``, a body that fails validation): the app answers it
        then, with FastAPI's messages. The call always answers (errors included)."""
        if not self.guard.plain(headers):  # a browser's request, a foreign Host, a big body: the app's guard
            return None
        sid = hot.sandbox_id
        if hot.route is _GET:
            return lambda: self._serve(headers, sid, lambda ctx: self._get(ctx, sid))
        ctype = (_header(headers, b"content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return None
        if hot.route is _CREATE:
            create_body = _parse(CreateSandboxRequest, body)
            if create_body is None:
                return None
            return lambda: self._serve(headers, "", lambda ctx: create(ctx, create_body), status=201, after=log_created)
        run_body = _parse(RunCommandRequest, body)
        if run_body is None or run_body.background:
            return None
        return lambda: self._serve(headers, sid, lambda ctx: run_foreground(ctx, sid, run_body))

    @staticmethod
    async def _get(ctx: AppContext, sandbox_id: str) -> SandboxResponse:
        return SandboxResponse.of(await ctx.manager.get(sandbox_id))

    async def _serve(
        self,
        headers: Headers,
        sandbox_id: str,
        handler: Callable[[AppContext], Awaitable[R]],
        *,
        status: int = 200,
        after: Callable[[AppContext, R], None] | None = None,
    ) -> Answer:
        ctx: AppContext = self.fastapi.state.ctx
        if sandbox_id:
            structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
        try:
            ctx.checker.check(_header(headers, b"authorization"))
            model = await handler(ctx)
        except BranchboxError as exc:
            ctx.metrics.count_api_error(exc.code)
            if exc.http_status >= 500:
                ctx.log.error("api.error", code=exc.code, message=exc.message)  # noqa: TRY400 - expected, no trace
            return Answer(exc.http_status, error_json(exc.code, exc.message, exc.details or None))
        except Exception as exc:  # the same answer as the app's handler of unexpected errors
            ctx.metrics.count_api_error("internal")
            ctx.log.exception("api.unexpected", error_type=type(exc).__name__)
            return Answer(500, error_json("internal", f"internal error ({type(exc).__name__}); see the daemon log"))
        body = model if isinstance(model, StreamedJson) else model.__pydantic_serializer__.to_json(model)
        return Answer(status, body, None if after is None else functools.partial(after, ctx, model))


def _header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _parse(model: type[M], raw: bytes) -> M | None:
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None  # FastAPI answers with its own 400 message
