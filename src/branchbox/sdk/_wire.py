"""The sync SDK's fast path for small JSON requests: keep-alive HTTP/1.1 on plain sockets.

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
import re
import select
import socket
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


class _Conn:
    """One keep-alive HTTP/1.1 connection: requests written in one ``sendall``, responses parsed by hand
    (http.client parses headers with the email package: ~0.2 ms per response)."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()  # appended and consumed in place: a large body costs linear time, not quadratic

    def idle_ok(self) -> bool:
        """An idle keep-alive connection must have nothing to read; readable means closed by the daemon."""
        return not self.buf and not select.select([self.sock], [], [], 0)[0]

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected("the daemon closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise http.client.LineTooLong("response header line")
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return out

    def exchange(self, request: bytes, head_only: bool) -> tuple[Reply, bool]:
        """Send ``request``; return the reply and whether the connection can be reused."""
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise http.client.LineTooLong("response header")
            self._fill()
        head = self.buf[:end].decode("latin-1")
        del self.buf[: end + 4]
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise http.client.BadStatusLine(status_line)
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        keep = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if head_only or status in (204, 304) or 100 <= status < 200:
            content = b""
        elif "content-length" in headers:
            content = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            content = self._chunked()
        else:  # delimited by the end of the connection
            content, keep = self._rest(), False
        return Reply(status, headers, content), keep

    def _chunked(self) -> bytes:
        chunks = []
        while size := int(self._line().split(b";", 1)[0], 16):
            chunks.append(self._take(size))
            self._take(2)
        while self._line():  # trailers, then the empty line
            pass
        return b"".join(chunks)

    def _rest(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.buf += chunk
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def close(self) -> None:
        self.sock.close()


_MAX_HEAD = 65536
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Wire:
    """A small pool of keep-alive connections to one daemon. Thread-safe; ``close()`` drops them all."""

    def __init__(self, config: ConnectionConfig) -> None:
        parts = urlsplit(config.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        headers = {**config.headers(), "host": parts.netloc, "accept": "application/json"}
        for key, value in headers.items():
            if _CONTROL.search(key) or _CONTROL.search(value):
                raise httpx.InvalidURL(f"header {key!r} holds a control character: check the URL and API key")
        self._head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    def _new(self, timeout: float | None) -> _Conn:
        sock = socket.create_connection((self._host, self._port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._https:
            sock = default_ssl_context().wrap_socket(sock, server_hostname=self._host)
        return _Conn(sock)

    def _take(self) -> _Conn | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.idle_ok():
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Reply:
        """One request. A reused connection the daemon closed meanwhile is retried once on a new one (the
        request never reached the daemon: it closes idle connections only between requests)."""
        if _CONTROL.search(path) or " " in path:
            raise httpx.InvalidURL(f"the request path {path!r} holds a space or control character")
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}"
        if body is None:
            raw = (head + "\r\n").encode("latin-1")
        else:
            raw = (head + f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode(
                "latin-1"
            ) + body
        conn = self._take()
        if conn is not None:
            try:
                return self._exchange(conn, raw, method, timeout, reused=True)
            except _Stale:
                pass
        try:
            conn = self._new(timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection within {timeout} s") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return self._exchange(conn, raw, method, timeout, reused=False)

    def _exchange(self, conn: _Conn, raw: bytes, method: str, timeout: float | None, *, reused: bool) -> Reply:
        try:
            conn.sock.settimeout(timeout)
            reply, keep = conn.exchange(raw, method == "HEAD")
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            conn.close()
            if reused:
                raise _Stale from exc
            raise httpx.RemoteProtocolError(f"the daemon closed the connection ({exc})") from exc
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout(f"no answer within {timeout} s") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            conn.close()
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        if keep:
            self._give_back(conn)
        else:
            conn.close()
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


def acquire(config: ConnectionConfig) -> Wire:
    """The pool for ``config``'s daemon (the sync twin of :func:`branchbox.sdk._awire.acquire`): the process-wide
    one, so a new sandbox object reuses what a closed one left idle."""
    return shared_wire(config)


def release(config: ConnectionConfig, wire: Wire) -> None:
    """One user fewer: nothing to do, the process-wide pool keeps its idle connections (closed at exit)."""


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
