"""The hot routes without FastAPI's per-request machinery (middleware stack, dependency solving, routing through
every route, response re-validation): ``POST /v1/sandboxes``, ``GET /v1/sandboxes/{id}`` and a foreground
``POST /v1/sandboxes/{id}/commands``.

It runs in front of the whole Starlette stack (``_App.__call__``) and does its own timing and logging. It parses
the body with the same pydantic model as the FastAPI route, checks the API key the same way and runs the same
shared function. Whatever it does not handle the normal way (another route, not JSON, ``background=true``, a body
that fails validation) goes on to FastAPI with the body replayed, so error messages and the OpenAPI document stay
those of the FastAPI routes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from branchbox.api.context import AppContext
from branchbox.api.routes_commands import run_foreground
from branchbox.api.routes_sandboxes import create
from branchbox.api.schemas import CreateSandboxRequest, RunCommandRequest, SandboxResponse
from branchbox.errors import BranchboxError

if TYPE_CHECKING:
    from fastapi import FastAPI

M = TypeVar("M", bound=BaseModel)
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


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode("ascii"))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
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


class FastPath:
    """Serves the hot routes directly; everything else (and anything unusual) goes to ``app``.

    ``observe(scope, status, seconds)`` records each request it serves itself (``app`` records the others)."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, *, observe: Callable[[Scope, int, float], None]) -> None:
        self.app = app
        self.fastapi = fastapi
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        t0 = time.perf_counter()
        rest = await self._fast(scope, receive, send)
        if rest is not None:
            await self.app(scope, rest, send)
        elif "route" in scope:  # served here (not a client that went away before its body came)
            self.observe(scope, scope.pop("branchbox.status", 500), time.perf_counter() - t0)

    async def _fast(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:  # noqa: PLR0911 - flat
        """Serve a hot route; else return the ``receive`` to hand to the app (the body replayed if it was read)."""
        method, path = scope["method"], scope["path"]
        if method == "GET":
            m = _SANDBOX.match(path)
            if m is not None:
                sid = m.group(1)
                await self._serve(scope, send, _GET, sid, lambda ctx: self._get(ctx, sid))
                return None
            return receive
        run = _COMMANDS.match(path) if method == "POST" else None
        if run is None and not (method == "POST" and path == "/v1/sandboxes"):
            return receive
        ctype = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        try:
            raw = await _read_body(receive)
        except ConnectionAbortedError:
            return None
        if ctype != "application/json":
            return _replay(raw)
        if run is None:
            create_body = _parse(CreateSandboxRequest, raw)
            if create_body is None:
                return _replay(raw)
            await self._serve(scope, send, _CREATE, None, lambda ctx: create(ctx, create_body), status=201)
            return None
        run_body = _parse(RunCommandRequest, raw)
        if run_body is None or run_body.background:
            return _replay(raw)
        sid = run.group(1)
        await self._serve(scope, send, _RUN, sid, lambda ctx: run_foreground(ctx, sid, run_body))
        return None

    @staticmethod
    async def _get(ctx: AppContext, sandbox_id: str) -> SandboxResponse:
        return SandboxResponse.of(await ctx.manager.get(sandbox_id))

    async def _serve(
        self,
        scope: Scope,
        send: Send,
        route: RouteName,
        sandbox_id: str | None,
        handler: Callable[[AppContext], Awaitable[BaseModel]],
        *,
        status: int = 200,
    ) -> None:
        scope["route"] = route
        ctx: AppContext = self.fastapi.state.ctx
        if sandbox_id is not None:
            structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
        try:
            ctx.checker.check(_header(scope, b"authorization"))
            model = await handler(ctx)
        except BranchboxError as exc:
            ctx.metrics.count_api_error(exc.code)
            if exc.http_status >= 500:
                ctx.log.error("api.error", code=exc.code, message=exc.message)  # noqa: TRY400 - expected, no trace
            scope["branchbox.status"] = exc.http_status
            await _respond(send, exc.http_status, error_json(exc.code, exc.message, exc.details or None))
            return
        except Exception as exc:  # the same answer as the app's handler of unexpected errors
            ctx.metrics.count_api_error("internal")
            ctx.log.exception("api.unexpected", error_type=type(exc).__name__)
            scope["branchbox.status"] = 500
            message = f"internal error ({type(exc).__name__}); see the daemon log"
            await _respond(send, 500, error_json("internal", message))
            return
        scope["branchbox.status"] = status
        await _respond(send, status, model.__pydantic_serializer__.to_json(model))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _parse(model: type[M], raw: bytes) -> M | None:
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None  # FastAPI answers with its own 400 message


def error_json(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    """The one error body: ``{"error": {"code", "message"[, "details"]}}``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return json.dumps({"error": body}).encode("utf-8")
