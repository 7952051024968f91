"""The async SDK's fast path for small JSON requests: keep-alive HTTP/1.1, one asyncio protocol per connection.

The async twin of :mod:`branchbox.sdk._wire`. A pool is shared by every ``AsyncSandbox`` of one event loop and
daemon (URL + key) and closed when the last of them closes, so a burst of creates reuses connections instead of
each opening its own httpx client and connection. Streams and requests with query parameters stay on httpx.
Failures raise the httpx exceptions the rest of the SDK maps to its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any
from urllib.parse import urlsplit

import httpx

from branchbox.sdk._config import ConnectionConfig, default_ssl_context
from branchbox.sdk._wire import Reply

MAX_IDLE = 64
_MAX_HEAD = 65536


class _Stale(Exception):
    """A pooled connection was closed by the daemon before our request."""


class _Lost(Exception):
    """The connection closed before the whole answer came; ``partial``: some of it had come."""

    def __init__(self, partial: bool) -> None:
        super().__init__("the daemon closed the connection without an answer")
        self.partial = partial


class _Conn(asyncio.Protocol):
    """One keep-alive connection. The answer to the request in flight is parsed as its bytes arrive and handed
    to ``waiter``: one future per request (no stream reader, no drain, no task switch until it is complete)."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.head_only = False
        self.closed = False
        self._head: tuple[int, dict[str, str], int] | None = None  # status, headers, where the body starts
        self._chunks: _Chunks | None = None  # a chunked body's progress: each byte is parsed once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse(eof=False)
            except (ValueError, IndexError) as exc:
                self._fail(httpx.RemoteProtocolError(f"bad answer from the daemon ({exc!r})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            if self._head is not None and self._parse(eof=True):
                return
        except (ValueError, IndexError):
            pass
        waiter.set_exception(_Lost(partial=bool(self.buf)))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def _parse(self, *, eof: bool) -> bool:
        """Hand the answer to the waiter if it is complete (``eof``: the connection closed, which ends a body
        without a length). Raises ValueError on a malformed answer."""
        buf = self.buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise ValueError("response head too long")
                return False
            status, headers = _parse_head(bytes(buf[:end]))
            self._head = status, headers, end + 4
        status, headers, start = self._head
        close = headers.get("connection", "").lower() == "close"
        if self.head_only or status in (204, 304):
            content, used = b"", start
        elif "content-length" in headers:
            used = start + int(headers["content-length"])
            if len(buf) < used:
                return False
            content = bytes(buf[start:used])
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            if self._chunks is None:
                self._chunks = _Chunks(start)
            used = self._chunks.advance(buf)
            if used < 0:
                return False
            content = b"".join(self._chunks.parts)
        elif eof:
            content, used, close = bytes(buf[start:]), len(buf), True
        else:
            return False  # the body ends when the connection closes
        del buf[:used]
        self._head = self._chunks = None
        if close:
            self.close()
        assert self.waiter is not None
        self.waiter.set_result(Reply(status, headers, content))
        return True

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Chunks:
    """A chunked body parsed as its bytes arrive (our daemon sends no trailers): ``parts`` so far and where the
    next chunk's size line starts. Parsing from the start on every read made a large chunked answer quadratic (a
    foreground run's JSON comes in parts)."""

    __slots__ = ("parts", "pos")

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.parts: list[bytes] = []

    def advance(self, buf: bytearray) -> int:
        """Take the complete chunks in ``buf``; where the body ends once its last chunk came, else -1."""
        while True:
            eol = buf.find(b"\r\n", self.pos)
            if eol < 0:
                return -1
            size = int(bytes(buf[self.pos : eol]).split(b";", 1)[0].strip(), 16)
            end = eol + 2 + size + 2
            if len(buf) < end:
                return -1
            if size == 0:
                return end
            self.parts.append(bytes(buf[eol + 2 : eol + 2 + size]))
            self.pos = end


def _expire(waiter: asyncio.Future[Reply], timeout: float | None) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout(f"no answer within {timeout} s"))


class AsyncWire:
    """Pooled keep-alive connections to one daemon, used from one event loop."""

    def __init__(self, config: ConnectionConfig, *, connect_timeout: float | None = None) -> None:
        self._connect_timeout = connect_timeout  # None: a request's own timeout bounds its connect too
        parts = urlsplit(config.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        head = {**config.headers(), "host": parts.netloc, "accept": "application/json"}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode("latin-1")
        self._idle: list[_Conn] = []
        self.users = 0

    async def _new(self, timeout: float | None) -> _Conn:
        ssl = default_ssl_context() if self._https else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Conn, self._host, self._port, ssl=ssl)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection within {timeout} s") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return conn

    def _take(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.buf:  # bytes while idle: out of step with the daemon
                return conn
            conn.close()
        return None

    async def request(
        self, method: str, path: str, body: bytes | None, timeout: float | None, *, extra: bytes = b""
    ) -> Reply:
        """One request. A reused connection the daemon closed meanwhile is retried once on a new one. ``extra``:
        more header lines, each ending in CRLF (the fleet controller passes its caller's ``authorization``)."""
        lines = [f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._head, extra]
        if body is not None:
            lines.append(b"content-type: application/json\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body or b""))
        lines += [b"\r\n", body or b""]
        raw = b"".join(lines)
        conn = self._take()
        if conn is not None:
            try:
                return await self._exchange(conn, raw, method, timeout, reused=True)
            except _Stale:
                pass
        connect = timeout if self._connect_timeout is None else self._connect_timeout
        return await self._exchange(await self._new(connect), raw, method, timeout, reused=False)

    async def _exchange(self, conn: _Conn, raw: bytes, method: str, timeout: float | None, *, reused: bool) -> Reply:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Reply] = loop.create_future()
        conn.waiter, conn.head_only = waiter, method == "HEAD"
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter, timeout)
        try:
            conn.transport.write(raw)
            reply = await waiter
        except _Lost as exc:
            conn.close()
            if reused and not exc.partial:
                raise _Stale from exc
            raise httpx.RemoteProtocolError("the daemon closed the connection without an answer") from exc
        except BaseException:
            conn.close()  # failed, timed out or cancelled mid-exchange: the connection's state is unknown
            raise
        finally:
            conn.waiter = None
            if timer is not None:
                timer.cancel()
        if conn.closed or len(self._idle) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)
        return reply

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str | None], AsyncWire]] = (
    weakref.WeakKeyDictionary()
)


def acquire(config: ConnectionConfig) -> AsyncWire:
    """The pool of this event loop for ``config``'s daemon; pair with :func:`release`."""
    pools = _pools.setdefault(asyncio.get_running_loop(), {})
    key = (config.base_url, config.api_key)
    wire = pools.get(key)
    if wire is None:
        wire = pools[key] = AsyncWire(config)
    wire.users += 1
    return wire


def release(config: ConnectionConfig, wire: AsyncWire) -> None:
    """One user fewer; the last one closes the pooled connections."""
    wire.users -= 1
    if wire.users > 0:
        return
    wire.close()
    with contextlib.suppress(RuntimeError):
        pools = _pools.get(asyncio.get_running_loop(), {})
        if pools.get((config.base_url, config.api_key)) is wire:
            del pools[(config.base_url, config.api_key)]
