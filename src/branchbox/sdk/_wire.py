"""The sync SDK's fast path for small JSON requests: keep-alive HTTP/1.1 on the standard library's http.client.

httpx costs about 0.5 ms of Python per request (URL merging, its h11 state machine, two sends per request);
create, exec and get are single small request/response pairs, so they go through this lean path instead:
one ``sendall`` per request, pooled keep-alive connections. Streams (uploads, downloads) and requests with query
parameters stay on httpx. Failures raise the same httpx exceptions the rest of the SDK maps to its errors.

Connections are pooled per daemon (URL + key) for the whole process (:func:`shared_wire`), so that
``Sandbox.create()`` reuses the connection a closed sandbox object left idle instead of connecting again
(~0.5 ms). At most ``MAX_IDLE`` idle connections per daemon are kept; a forked child starts with none.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import select
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx

from branchbox.sdk._config import ConnectionConfig, default_ssl_context

MAX_IDLE = 8


class _Stale(Exception):
    """A pooled connection was closed by the daemon before our request."""


class Reply:
    """A finished response: status, headers, body (what the SDK reads of an ``httpx.Response``)."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class Wire:
    """A small pool of keep-alive connections to one daemon. Thread-safe; ``close()`` drops them all."""

    def __init__(self, config: ConnectionConfig) -> None:
        parts = urlsplit(config.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {**config.headers(), "host": parts.netloc, "accept": "application/json"}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _new(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=default_ssl_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _take(self) -> http.client.HTTPConnection | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                sock = conn.sock
                # an idle keep-alive connection must have nothing to read; readable means closed by the daemon
                if sock is not None and not select.select([sock], [], [], 0)[0]:
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Reply:
        """One request. A reused connection the daemon closed meanwhile is retried once on a new one (the
        request never reached the daemon: it closes idle connections only between requests)."""
        conn = self._take()
        if conn is not None:
            try:
                return self._exchange(conn, method, path, body, timeout, reused=True)
            except _Stale:
                pass
        return self._exchange(self._new(timeout), method, path, body, timeout, reused=False)

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        timeout: float | None,
        *,
        reused: bool,
    ) -> Reply:
        headers = dict(self._headers)
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.request(method, self._prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            content = resp.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            conn.close()
            if reused:
                raise _Stale from exc
            raise httpx.RemoteProtocolError(f"the daemon closed the connection ({exc})") from exc
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout(f"no answer within {timeout} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, content)
        if resp.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


_shared: dict[tuple[str, str | None], Wire] = {}
_shared_lock = threading.Lock()


def shared_wire(config: ConnectionConfig) -> Wire:
    """The process-wide connection pool for ``config``'s daemon and key."""
    key = (config.base_url, config.api_key)
    with _shared_lock:
        wire = _shared.get(key)
        if wire is None:
            wire = _shared[key] = Wire(config)
        return wire


def close_shared() -> None:
    """Close every pooled connection (at exit; also usable by long-running clients)."""
    with _shared_lock:
        wires = list(_shared.values())
        _shared.clear()
    for wire in wires:
        wire.close()


def _forget_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()  # the parent's sockets are not ours to use


atexit.register(close_shared)
os.register_at_fork(after_in_child=_forget_in_child)
