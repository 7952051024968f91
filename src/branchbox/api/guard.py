"""Who may talk to the API from a browser, and how big a request may be: checked before any route runs.

A daemon on loopback without keys trusts whoever can connect, which includes every page a browser on the host
shows. Three checks keep those pages out (docs/architecture.md, "Security model"):

* **Host.** DNS rebinding points an attacker's name at 127.0.0.1; the browser then sends ``Host: evil.example``.
  The API answers only Host names on its allow-list: ``localhost`` and its subdomains (browsers resolve them to
  loopback), the bind address, any IP literal (a rebinding needs a name), and ``allowed_hosts`` (``*`` for any,
  ``.example.com`` for subdomains). Else 403 ``host_not_allowed``.
* **Origin.** A browser marks requests a page makes with ``Origin`` (``null`` from a sandboxed document) and,
  in current browsers, ``Sec-Fetch-Site``. Such a request is refused (403 ``origin_not_allowed``) unless its
  origin is in ``allowed_origins`` or is the API's own (same host and port as the request's ``Host``). Clients
  that are not browsers (SDK, CLI, curl) send neither header.
* **Sandbox content.** Host names ``{port}-{sandbox_id}.{port_domain}`` (default domain ``localhost``, which
  browsers resolve to loopback) are the port proxy's: each port of each sandbox is an origin of its own, and
  no API route answers there.

Request bodies above ``max_body_bytes`` (uploads and the port proxy: ``max_upload_bytes``) are answered 413
``payload_too_large``, by their Content-Length before anything is read, or when the streamed bytes pass the
limit. WebSocket upgrades under ``/v1/`` check the API key before the app accepts them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from branchbox.api.responses import error_json
from branchbox.api.settings import LOOPBACK_HOSTS, ApiSettings
from branchbox.errors import (
    BranchboxError,
    HostNotAllowedError,
    OriginNotAllowedError,
    PayloadTooLargeError,
    UnauthorizedError,
)

if TYPE_CHECKING:
    from branchbox.api.auth import ApiKeyChecker

Headers = Iterable[tuple[bytes, bytes]]
_UPLOADS = re.compile(
    r"^(/v1/sandboxes/[^/]+/(files|files/archive|ports/\d+(/.*)?)|/files|/v1/templates)$"
)  # /files: E2B's envd
_API_WS = re.compile(r"^/v1/(?!sandboxes/[^/]+/ports/\d)")  # the API's WebSockets (not the port proxy's path)
_BROWSER_SITES = frozenset({b"same-origin", b"none"})  # Sec-Fetch-Site values of the API's own pages, typed URLs


def hostname(value: str) -> str:
    """The host name of a Host header or an origin's authority, lower case, without port or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """The checks of one app (from its :class:`ApiSettings`)."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        extras = [h.strip().lower().rstrip(".") for h in settings.allowed_hosts if h.strip()]
        self.any_host = "*" in extras
        self.hosts = frozenset({*LOOPBACK_HOSTS, settings.host.lower(), *(h for h in extras if not h.startswith("."))})
        self.suffixes = tuple(h for h in extras if h.startswith("."))
        self.origins = frozenset(o.strip().lower().rstrip("/") for o in settings.allowed_origins if o.strip())
        domain = re.escape(settings.port_domain.strip().lower().strip("."))
        self._port_host = re.compile(rf"^(\d{{1,5}})-([a-z0-9][a-z0-9_-]{{0,127}})\.{domain}$")

    def port_target(self, host: str | None) -> tuple[int, str] | None:
        """(port, sandbox id) when ``host`` (a Host header) names a sandbox port, else None."""
        if not host:
            return None
        m = self._port_host.match(hostname(host))
        return None if m is None else (int(m.group(1)), m.group(2))

    def host_allowed(self, host: str | None) -> bool:
        if host is None or self.any_host:
            return True  # HTTP/1.0 without Host: not a browser
        name = hostname(host)
        if name in self.hosts or _is_ip(name) or name.endswith(".localhost"):  # *.localhost: always loopback
            return True
        return any(name.endswith(s) for s in self.suffixes)

    def api_error(self, headers: Headers, *, signed: bool = False) -> BranchboxError | None:
        """Why a request to the API (not to a sandbox port) is refused, or None. ``signed``: the request carries
        its own credential made for browsers (an E2B signed file URL): only its Host is checked."""
        host = origin = site = None
        for k, v in headers:
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"origin":
                origin = v.decode("latin-1")
            elif k == b"sec-fetch-site":
                site = v
        if not self.host_allowed(host):
            return HostNotAllowedError(
                f"Host {hostname(host or '')!r} is not one of this daemon's names: use localhost or an address, "
                "or add the name to allowed_hosts (BRANCHBOX_ALLOWED_HOSTS)"
            )
        if signed:
            return None
        if origin is not None and not self._origin_ok(origin.strip().lower().rstrip("/"), host):
            return OriginNotAllowedError(
                f"requests from the browser origin {origin[:100]!r} are refused: add it to allowed_origins "
                "(BRANCHBOX_ALLOWED_ORIGINS) if its pages may use the API"
            )
        if origin is None and site is not None and site.strip().lower() not in _BROWSER_SITES:
            return OriginNotAllowedError(
                "requests a page of another site makes are refused (Sec-Fetch-Site: "
                f"{site.decode('latin-1')[:30]}): add its origin to allowed_origins"
            )
        return None

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        if origin in self.origins or "*" in self.origins:
            return True
        scheme, _, authority = origin.partition("://")
        return scheme in ("http", "https") and host is not None and authority == host.strip().lower()

    def plain(self, headers: Headers) -> bool:
        """True for a request the fast path may answer: no browser headers, an allowed Host, a small body."""
        host = None
        for k, v in headers:
            if k in (b"origin", b"sec-fetch-site", b"transfer-encoding"):
                return False
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"content-length" and (not v.isdigit() or int(v) > self.settings.max_body_bytes):
                return False
        return self.host_allowed(host) and self.port_target(host) is None

    def limit(self, path: str) -> int:
        return self.settings.max_upload_bytes if _UPLOADS.match(path) else self.settings.max_body_bytes


class GuardMiddleware:
    """Pure ASGI middleware in front of the port proxy and the routes: the checks of :class:`Guard`."""

    def __init__(self, app: ASGIApp, guard: Guard, checker: ApiKeyChecker) -> None:
        self.app, self.guard, self.checker = app, guard, checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        host = next((v.decode("latin-1") for k, v in headers if k == b"host"), None)
        sandbox_port = self.guard.port_target(host) is not None
        error = None if sandbox_port else self.guard.api_error(headers, signed=_signed(scope))
        if error is None and scope["type"] == "websocket" and not sandbox_port and _API_WS.match(scope["path"]):
            error = _key_error(self.checker, headers)  # before the route accepts the upgrade (ports: their token)
        if error is not None:
            await refuse(scope, send, error)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        limit = self.guard.settings.max_upload_bytes if sandbox_port else self.guard.limit(scope["path"])
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await refuse(scope, send, _too_large(limit))
            return
        await _Limited(self.app, limit)(scope, receive, send)


def _signed(scope: Scope) -> bool:
    """An E2B signed file URL (``/files?...&signature=``, docs/e2b.md): meant to be opened by browsers."""
    return scope["path"] == "/files" and b"signature=" in scope.get("query_string", b"")


def _key_error(checker: ApiKeyChecker, headers: Headers) -> BranchboxError | None:
    authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
    try:
        checker.check(authorization)
    except UnauthorizedError as exc:
        return exc
    return None


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than {limit} bytes: send less (files: upload in parts), or raise "
        "max_body_bytes / max_upload_bytes in the daemon's config",
        limit=limit,
    )


class _Limited:
    """Counts a streamed body: past ``limit`` the app reads a disconnect, and the client gets 413 if nothing was
    answered yet (else its connection is cut)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        started = over = False

        async def limited_receive() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    if not started:
                        await refuse(scope, send, _too_large(self.limit))
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if over:
                if started:
                    raise RuntimeError("request body over the limit")  # uvicorn cuts the connection
                return  # the 413 is the answer
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        await self.app(scope, limited_receive, guarded_send)


async def refuse(scope: Scope, send: Send, exc: BranchboxError) -> None:
    """Answer ``exc`` as the API's error body (HTTP), or close a WebSocket before accepting it (403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": f"{exc.code}: {exc.message}"[:120]})
        return
    body = error_json(exc.code, exc.message, exc.details or None)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
