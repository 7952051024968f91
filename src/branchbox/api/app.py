"""The ASGI app: ``create_app(manager, settings)``.

FastAPI (on Starlette) because its pydantic models give us the OpenAPI document we check in and test against,
and Starlette gives WebSockets and streamed bodies. Every error leaves as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import branchbox.api.routes_commands as routes_commands
import branchbox.api.routes_files as routes_files
import branchbox.api.routes_images as routes_images
import branchbox.api.routes_network as routes_network
import branchbox.api.routes_pools as routes_pools
import branchbox.api.routes_sandboxes as routes_sandboxes
import branchbox.api.routes_snapshots as routes_snapshots
import branchbox.api.routes_templates as routes_templates
import branchbox.api.routes_workspaces as routes_workspaces
import branchbox.api.streams as streams
from branchbox.api.auth import ApiKeyChecker
from branchbox.api.context import AppContext, Ctx, require_api_key
from branchbox.api.fastpath import FastPath
from branchbox.api.guard import Guard, GuardMiddleware
from branchbox.api.metrics import CONTENT_TYPE, Metrics
from branchbox.api.ports import PortProxy
from branchbox.api.schemas import ErrorResponse, HealthResponse, VersionResponse
from branchbox.api.settings import ApiSettings
from branchbox.api.warmup import warm_routes
from branchbox.e2b.gateway import E2BGateway
from branchbox.errors import (
    BranchboxError,
    PayloadTooLargeError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    WorkspaceNotFoundError,
)

if TYPE_CHECKING:
    from branchbox.core.manager import Manager
    from branchbox.workspaces.service import WorkspaceService

_HTTP_CODES = {401: "unauthorized", 403: "permission_denied", 404: "not_found", 429: "limit_exceeded"}
# an id with an encoded "/" (the SDK quotes ids) is decoded before routing, so it matches no route: it is still
# an id that does not exist, and is answered as one
_SLASHED_ID = re.compile(r"/v1/(sandboxes|snapshots|workspaces)/([^/?]*%2f[^/?]*)", re.IGNORECASE)
_SLASHED_KINDS: dict[str, tuple[type[BranchboxError], str, str]] = {
    "sandboxes": (SandboxNotFoundError, "sandbox", "sandbox ids"),
    "snapshots": (SnapshotNotFoundError, "snapshot", "snapshot ids and names"),
    "workspaces": (WorkspaceNotFoundError, "workspace", "workspace ids"),
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": desc}
    for status, desc in [
        (400, "Invalid request (code bad_request, invalid_path, ...)"),
        (401, "Missing or invalid API key"),
        (404, "Not found (sandbox_not_found, file_not_found, ...)"),
        (403, "Permission denied"),
        (409, "Conflict (invalid_state, file_exists)"),
        (413, "Above a size bound: command, stdin, env, metadata, path (payload_too_large)"),
        (429, "A limit was reached (limit_exceeded)"),
        (500, "Internal error (internal, backend_error)"),
        (501, "Not supported by this backend (not_supported)"),
        (502, "The in-sandbox agent failed (agent_error, agent_disconnected)"),
        (504, "Timed out (timeout)"),
    ]
}


class _App(FastAPI):
    """FastAPI whose OpenAPI document shows validation errors the way they are sent: 400 ErrorResponse, and whose
    hot routes (``fast``) are served before Starlette's middleware stack is entered at all."""

    fast: FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast is not None and scope["type"] == "http":
            await self.fast(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The normal FastAPI/Starlette path (middlewares, routing): what the fast path hands over to."""
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            self.openapi_schema = schema
        return self.openapi_schema


def _error_json(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


_TOO_LONG = frozenset({"string_too_long", "too_long", "bytes_too_long"})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) + " (see docs/openapi.json for the expected shape)"


class _Observe:
    """Pure ASGI middleware: request latency histogram, access log, fresh log context per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: structlog.typing.FilteringBoundLogger) -> None:
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            observe(self.metrics, self.log, scope["method"], route, status, time.perf_counter() - t0)


def observe(
    metrics: Metrics, log: structlog.typing.FilteringBoundLogger, method: str, route: str, status: int, seconds: float
) -> None:
    """Record one HTTP request (``route`` is its template): the latency histogram, and a log line (debug when it
    succeeded)."""
    metrics.observe_request(method, route, status, seconds)
    # successful requests are logged at debug level (the latency histogram counts them): formatting a JSON
    # log line costs ~15% of a hot request
    (log.info if status >= 400 else log.debug)(
        "http.request", method=method, path=route, status=status, ms=round(seconds * 1000, 3)
    )


def _build(settings: ApiSettings) -> _App:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await warm_routes(app)  # FastAPI's per-route state now, not on the first requests (~100 ms)
        yield

    app = _App(
        title="branchbox",
        version=settings.version,
        summary="Sandboxes for AI agents: create, run commands, edit files, stream output.",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
    )
    auth = [Depends(require_api_key), Depends(HTTPBearer(auto_error=False))]
    routes = (routes_sandboxes, routes_commands, routes_files, routes_pools, routes_snapshots, routes_network)
    for module in (*routes, routes_templates, routes_images, routes_workspaces):
        app.include_router(module.router, dependencies=auth)
    app.include_router(streams.router)

    @app.get(
        "/health",
        response_model=HealthResponse,
        response_model_exclude_none=True,  # {"status": "ok"} as before when nothing is degraded
        tags=["meta"],
        summary="Liveness and pressure",
    )
    async def health(ctx: Ctx) -> HealthResponse:
        disk = ctx.manager.disk_pressure()  # statvfs, ~2 us
        if disk.low:
            return HealthResponse(status="degraded", reasons=[f"disk: {disk.reason()}"])
        return HealthResponse()

    @app.get("/version", response_model=VersionResponse, tags=["meta"], summary="Daemon version")
    async def version() -> VersionResponse:
        return VersionResponse(version=settings.version)

    @app.get(
        "/metrics",
        response_class=Response,
        dependencies=auth,
        tags=["meta"],
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics(ctx: Ctx) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(BranchboxError)
    async def on_branchbox_error(request: Request, exc: BranchboxError) -> JSONResponse:
        _count(request, exc.code)
        if exc.http_status >= 500:
            structlog.get_logger("branchbox.api").error("api.error", code=exc.code, message=exc.message)
        return _error_json(exc.http_status, exc.code, exc.message, exc.details or None)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a size bound of limits.py (also when it is one branch of a union: cmd is a string or a list)
        if any(e.get("type") in _TOO_LONG for e in exc.errors()):
            _count(request, PayloadTooLargeError.code)
            return _error_json(413, PayloadTooLargeError.code, _validation_message(exc))
        _count(request, "bad_request")
        return _error_json(400, "bad_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slashed = _SLASHED_ID.match(request.scope.get("raw_path", b"").decode("latin-1"))
        if exc.status_code in (404, 405) and slashed is not None:  # 405: the rest of the path matched a route
            error, kind, names = _SLASHED_KINDS[slashed.group(1).lower()]
            missing = error(f"{kind} {unquote(slashed.group(2))!r} does not exist: {names} hold no '/'")
            return await on_branchbox_error(request, missing)
        code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        _count(request, code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such route {request.method} {request.url.path}: see /docs or docs/api.md for the routes"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}: see docs/api.md"
        return _error_json(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "internal")
        structlog.get_logger("branchbox.api").exception("api.unexpected", error_type=type(exc).__name__)
        return _error_json(500, "internal", f"internal error ({type(exc).__name__}); see the daemon log")

    return app


def _count(request: Request, code: str) -> None:
    ctx: AppContext | None = getattr(request.app.state, "ctx", None)
    if ctx is not None:
        ctx.metrics.count_api_error(code)


def create_app(
    manager: Manager,
    settings: ApiSettings | None = None,
    *,
    metrics: Metrics | None = None,
    workspaces: WorkspaceService | None = None,
) -> FastAPI:
    """The HTTP app over one open Manager and, for ``/v1/workspaces``, the workspace service attached to it
    (without one those routes answer ``not_supported``). Subscribes the app's metrics to the Manager's events."""
    settings = settings or ApiSettings()
    metrics = metrics or Metrics()
    log: structlog.typing.FilteringBoundLogger = structlog.get_logger("branchbox.api")
    app = _build(settings)
    checker = ApiKeyChecker(settings.api_key_hashes, required=settings.auth_required)
    app.state.ctx = AppContext(
        manager=manager, settings=settings, metrics=metrics, checker=checker, log=log, workspaces=workspaces
    )
    guard = Guard(settings)
    manager.subscribe(metrics.on_event, kinds=Metrics.EVENT_KINDS)
    metrics.watch_pools(manager.pool_statistics)
    metrics.watch_states(manager.state_counts)
    metrics.watch_agent_calls(manager.open_agent_calls)
    metrics.watch_disk(manager.disk_pressure)
    # {port}-{id}.<port_domain> and /v1/sandboxes/{id}/ports/{port}/... (HTTP and WebSocket)
    app.add_middleware(PortProxy, fastapi=app, guard=guard)
    app.add_middleware(E2BGateway)  # the E2B-compatible API: /sandboxes, /v2/sandboxes, envd calls (docs/e2b.md)
    app.add_middleware(GuardMiddleware, guard=guard, checker=checker)  # Host, Origin, body size, WebSocket keys
    app.add_middleware(_Observe, metrics=metrics, log=log)
    app.fast = FastPath(app.stack, app, observe=functools.partial(observe, metrics, log), guard=guard)
    return app


def openapi_document(settings: ApiSettings | None = None) -> dict[str, Any]:
    """The OpenAPI document of the app (no Manager needed): what docs/openapi.json holds."""
    return _build(settings or ApiSettings()).openapi()


def openapi_json(settings: ApiSettings | None = None) -> str:
    """The checked-in form: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(openapi_document(settings), indent=2, sort_keys=True) + "\n"
