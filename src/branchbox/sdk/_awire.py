"""The async SDK's HTTP client: keep-alive HTTP/1.1, one asyncio protocol per connection, for every request the
SDK makes (small JSON requests, query strings, bodies streamed both ways).

The async twin of :mod:`branchbox.sdk._wire`; HTTP itself is parsed by :mod:`branchbox.sdk._http1`. A small answer
is parsed as its bytes arrive and handed to one future (no stream reader, no drain, no task switch until it is
complete); a streamed one (:meth:`AsyncWire.stream`) is read as it comes, with the connection's reading paused
while more than ``HIGH_WATER`` bytes wait unread. A pool is shared by every ``AsyncSandbox`` of one event loop and
daemon (URL + key) and closed when the last of them closes, so a burst of creates reuses connections. Failures
raise :class:`~branchbox.sdk._http1.WireError` (``WireTimeout`` for a timeout), which the SDK maps to its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from branchbox.sdk._config import ConnectionConfig, default_ssl_context
from branchbox.sdk._http1 import (
    LAST_CHUNK,
    Endpoint,
    Lines,
    Parser,
    Recut,
    Reply,
    WireError,
    WireTimeout,
    _Stale,
    chunk,
    encode,
)

MAX_IDLE = 64
HIGH_WATER = 1 << 20  # unread bytes of a streamed answer before the connection stops reading
Content = bytes | AsyncIterable[bytes] | None


class _Lost(Exception):
    """The connection closed before the answer's head came; ``partial``: some of it had come."""

    def __init__(self, partial: bool) -> None:
        super().__init__("the daemon closed the connection without an answer")
        self.partial = partial


def _expire(fut: asyncio.Future[Any], timeout: float | None) -> None:
    if not fut.done():
        fut.set_exception(WireTimeout(f"no answer within {timeout} s"))


async def _wait(fut: asyncio.Future[Any], timeout: float | None) -> Any:
    """``await fut``, failed with WireTimeout after ``timeout`` s (one timer, no task)."""
    if timeout is None:
        return await fut
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut, timeout)
    try:
        return await fut
    finally:
        timer.cancel()


class _Conn(asyncio.Protocol):
    """One keep-alive connection. For a whole answer (``waiter``) the body is collected as its bytes arrive and the
    waiter wakes once, when it is complete; for a streamed one, ``head`` wakes when the head is parsed and
    ``more`` whenever bytes (or the end) came."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buf = bytearray()
        self.parser: Parser | None = None
        self.waiter: asyncio.Future[Reply] | None = None  # a whole answer
        self.head: asyncio.Future[None] | None = None  # a streamed answer's head
        self.more: asyncio.Future[None] | None = None  # a streamed answer's next bytes
        self.parts: list[bytes] = []
        self.closed = False
        self.reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def start(self, parser: Parser, *, whole: bool) -> None:
        loop = asyncio.get_running_loop()
        self.parser, self.parts = parser, []
        if whole:
            self.waiter, self.head = loop.create_future(), None
        else:
            self.waiter, self.head = None, loop.create_future()

    def done_with(self) -> None:
        self.parser = self.waiter = self.head = self.more = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parser = self.parser
        if parser is None:
            return  # bytes while idle: out of step with the daemon (the pool drops this connection)
        try:
            if self.waiter is not None:
                if self.waiter.done() or not parser.parse_head():
                    return
                self.parts.append(parser.body())
                if parser.done:
                    self.waiter.set_result(Reply(parser.status, parser.headers, b"".join(self.parts)))
            elif self.head is not None:
                if not self.head.done():
                    if parser.parse_head():
                        self.head.set_result(None)
                elif self.more is not None and not self.more.done():
                    self.more.set_result(None)
                if len(self.buf) > HIGH_WATER and not self.reading_paused:
                    self.reading_paused = True
                    self.transport.pause_reading()
        except (ValueError, IndexError) as exc:
            self._fail(WireError(f"bad answer from the daemon ({exc!r})"))

    def resume(self) -> None:
        """The reader took what was waiting: read again."""
        if self.reading_paused and len(self.buf) < HIGH_WATER // 2 and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in (self.more, self._drain):
            if fut is not None and not fut.done():
                fut.set_result(None)  # the reader (or writer) sees ``closed``
        parser, waiter = self.parser, self.waiter or self.head
        if parser is None or waiter is None or waiter.done():
            return
        if self.waiter is not None and parser.state >= 0:  # a body that ends with the connection
            try:
                self.parts.append(parser.body(eof=True))
                self.waiter.set_result(Reply(parser.status, parser.headers, b"".join(self.parts)))
            except (ValueError, IndexError) as err:
                self.waiter.set_exception(WireError(f"bad answer from the daemon ({err})"))
            return
        waiter.set_exception(_Lost(partial=bool(self.buf)))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self, timeout: float | None) -> None:
        """Wait until the transport's write buffer has room (an upload goes no faster than the daemon takes it)."""
        if self._writing_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await _wait(self._drain, timeout)
        if self.closed:
            raise ConnectionResetError("the daemon closed the connection")

    def _fail(self, exc: Exception) -> None:
        for fut in (self.waiter, self.head):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncStreamed:
    """A response whose body is read as it comes: ``aread()``, ``aiter_bytes()``, ``aiter_lines()``. Its connection
    goes back to the pool when the body was read to its end, else it is closed (:meth:`AsyncWire.stream` does it)."""

    def __init__(self, conn: _Conn, parser: Parser, timeout: float | None) -> None:
        self._conn = conn
        self._parser = parser
        self._timeout = timeout
        self.status_code = parser.status
        self.headers = parser.headers

    async def _next(self) -> bytes | None:
        """The next body bytes (at least one), or None at the end of the body."""
        conn, parser = self._conn, self._parser
        while True:
            try:
                data = parser.body(eof=conn.closed)
            except ValueError as exc:
                raise WireError(f"bad answer from the daemon ({exc})") from exc
            conn.resume()
            if data:
                return data
            if parser.done or conn.closed:
                return None
            conn.more = asyncio.get_running_loop().create_future()
            await _wait(conn.more, self._timeout)

    async def aiter_bytes(self, size: int | None = None) -> AsyncIterator[bytes]:
        """The body in pieces as they come (re-cut to ``size`` bytes, the last one shorter, when given)."""
        cut = Recut(size)
        while (data := await self._next()) is not None:
            for piece in cut.feed(data):
                yield piece
        for piece in cut.rest():
            yield piece

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines (UTF-8, without their line ends) as they come."""
        lines = Lines()
        while (data := await self._next()) is not None:
            for line in lines.feed(data):
                yield line
        for line in lines.rest():
            yield line

    async def aread(self) -> bytes:
        """The rest of the body."""
        return b"".join([data async for data in self.aiter_bytes()])


class AsyncWire:
    """Pooled keep-alive connections to one daemon, used from one event loop."""

    def __init__(self, config: ConnectionConfig, *, connect_timeout: float | None = None) -> None:
        self._connect_timeout = connect_timeout  # None: a request's own timeout bounds its connect too
        self._to = Endpoint.of(config.base_url, config.headers())
        self._idle: list[_Conn] = []
        self.users = 0

    async def _new(self, timeout: float | None) -> _Conn:
        ssl = default_ssl_context() if self._to.https else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Conn, self._to.host, self._to.port, ssl=ssl)
        except TimeoutError as exc:
            raise WireTimeout(f"no connection within {timeout} s") from exc
        except OSError as exc:
            raise WireError(f"cannot connect ({exc.strerror or exc})") from exc
        return conn

    def _take(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.buf:  # bytes while idle: out of step with the daemon
                return conn
            conn.close()
        return None

    def _give_back(self, conn: _Conn, parser: Parser) -> None:
        conn.done_with()
        if conn.closed or not parser.done or not parser.keep_alive or conn.buf or len(self._idle) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        timeout: float | None,
        *,
        query: str = "",
        content: Content = None,
        extra: bytes = b"",
        content_type: str | None = None,
    ) -> Reply:
        """One request, its whole answer. ``body``: JSON; ``content``: raw bytes, or an async iterable of them
        sent chunked as it yields; ``query``: ``?...`` already encoded; ``extra``: more header lines, each ending
        in CRLF (the fleet controller passes its caller's ``authorization``); ``content_type``: instead of JSON
        for ``body``, octet-stream for ``content``."""
        raw, chunks = self._encode(method, path, body, query, content, extra, content_type)
        conn, parser, reply = await self._open(raw, chunks, method, timeout, whole=True)
        self._give_back(conn, parser)
        assert reply is not None
        return reply

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        body: bytes | None,
        timeout: float | None,
        *,
        query: str = "",
        content: Content = None,
        extra: bytes = b"",
        content_type: str | None = None,
    ) -> AsyncIterator[AsyncStreamed]:
        """One request whose answer's body is read as it comes, inside the ``async with`` block (the arguments
        are :meth:`request`'s)."""
        raw, chunks = self._encode(method, path, body, query, content, extra, content_type)
        conn, parser, _ = await self._open(raw, chunks, method, timeout, whole=False)
        try:
            yield AsyncStreamed(conn, parser, timeout)
        except BaseException:
            conn.close()
            raise
        self._give_back(conn, parser)

    def _encode(
        self, method: str, path: str, body: bytes | None, query: str, content: Content, extra: bytes,
        content_type: str | None,
    ) -> tuple[bytes, AsyncIterable[bytes] | None]:  # fmt: skip
        target = self._to.prefix + path + query
        return encode(
            method, target, self._to.fixed, body=body, content=content, extra=extra, content_type=content_type
        )

    async def _open(
        self, raw: bytes, chunks: AsyncIterable[bytes] | None, method: str, timeout: float | None, *, whole: bool
    ) -> tuple[_Conn, Parser, Reply | None]:
        """Send the request and wait for its whole answer (``whole``) or its head: on an idle connection when the
        request can be sent again (one the daemon closed meanwhile is replaced once), else on a new one."""
        if chunks is None and (conn := self._take()) is not None:
            try:
                return conn, *await self._exchange(conn, raw, None, method, timeout, whole=whole, reused=True)
            except _Stale:
                pass
        conn = await self._new(timeout if self._connect_timeout is None else self._connect_timeout)
        return conn, *await self._exchange(conn, raw, chunks, method, timeout, whole=whole, reused=False)

    async def _exchange(
        self, conn: _Conn, raw: bytes, chunks: AsyncIterable[bytes] | None, method: str, timeout: float | None, *,
        whole: bool, reused: bool,
    ) -> tuple[Parser, Reply | None]:  # fmt: skip
        parser = Parser(conn.buf, head_only=method == "HEAD")
        conn.start(parser, whole=whole)
        answered: asyncio.Future[Any] | None = conn.waiter if whole else conn.head
        assert answered is not None
        try:
            conn.transport.write(raw)
            if chunks is not None:
                await self._upload(conn, chunks, timeout)
            got = await _wait(answered, timeout)
        except _Lost as exc:
            conn.close()
            if reused and not exc.partial:
                raise _Stale from exc
            raise WireError("the daemon closed the connection without an answer") from exc
        except BaseException:
            conn.close()  # failed, timed out or cancelled mid-exchange: the connection's state is unknown
            raise
        return parser, got

    @staticmethod
    async def _upload(conn: _Conn, chunks: AsyncIterable[bytes], timeout: float | None) -> None:
        """Write a chunked body as ``chunks`` yields, no faster than the daemon takes it. An answer that comes
        first (an error, before the daemon read the whole body) ends the upload; the connection is not reused."""
        answered = conn.waiter or conn.head
        assert answered is not None
        assert conn.parser is not None
        try:
            async for data in chunks:
                if answered.done() or conn.closed:
                    conn.parser.keep_alive = False
                    return
                if data:
                    conn.transport.write(chunk(data))
                    await conn.drain(timeout)
            conn.transport.write(LAST_CHUNK)
        except ConnectionResetError:
            conn.parser.keep_alive = False  # the answer (or its absence) tells the rest

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


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
