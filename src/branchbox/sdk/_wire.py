"""The sync SDK's HTTP client: keep-alive HTTP/1.1 on plain sockets, for every request the SDK makes (small JSON
requests, query strings, bodies streamed both ways). HTTP itself is parsed by :mod:`branchbox.sdk._http1`, shared
with the async client (:mod:`branchbox.sdk._awire`); docs/api.md has the measurement behind a client of our own.

Connections are pooled per daemon (URL + key) for the whole process (:func:`shared_wire`), so that
``Sandbox.create()`` reuses the connection a closed sandbox object left idle instead of connecting again
(~0.5 ms). At most ``MAX_IDLE`` idle connections per daemon are kept; a forked child starts with none. Failures
raise :class:`~branchbox.sdk._http1.WireError` (``WireTimeout`` for a timeout), which the SDK maps to its errors.
"""

from __future__ import annotations

import atexit
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from branchbox.sdk._config import ConnectionConfig, default_ssl_context
from branchbox.sdk._http1 import (
    LAST_CHUNK,
    Endpoint,
    InvalidRequest,
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

__all__ = ["InvalidRequest", "Reply", "Streamed", "Wire", "WireError", "WireTimeout", "shared_wire"]

MAX_IDLE = 8
_READ = 65536

Content = bytes | Iterable[bytes] | None
_T = TypeVar("_T")


class _Conn:
    """One keep-alive HTTP/1.1 connection and the bytes read from it but not yet parsed."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()  # appended and consumed in place: a large body costs linear time, not quadratic

    def idle_ok(self) -> bool:
        """An idle keep-alive connection must have nothing to read; readable means closed by the daemon."""
        return not self.buf and not select.select([self.sock], [], [], 0)[0]

    def fill(self) -> bool:
        """Read what came; False at the end of the connection."""
        data = self.sock.recv(_READ)
        self.buf += data
        return bool(data)

    def close(self) -> None:
        self.sock.close()


class Streamed:
    """A response whose body is read as it comes: ``read()``, ``iter_bytes()``, ``iter_lines()``. Its connection
    goes back to the pool when the body was read to its end, else it is closed (:meth:`Wire.stream` does it)."""

    def __init__(self, conn: _Conn, parser: Parser, timeout: float | None) -> None:
        self._conn = conn
        self._parser = parser
        self._timeout = timeout
        self.status_code = parser.status
        self.headers = parser.headers

    def _next(self) -> bytes | None:
        """The next body bytes (at least one), or None at the end of the body."""
        parser, timeout = self._parser, self._timeout
        while True:
            data = _io(parser.body, timeout)
            if data:
                return data
            if parser.done:
                return None
            if not _io(self._conn.fill, timeout):
                return _io(lambda: parser.body(eof=True), timeout) or None

    def iter_bytes(self, size: int | None = None) -> Iterator[bytes]:
        """The body in pieces as they come (re-cut to ``size`` bytes, the last one shorter, when given)."""
        cut = Recut(size)
        while (data := self._next()) is not None:
            yield from cut.feed(data)
        yield from cut.rest()

    def iter_lines(self) -> Iterator[str]:
        """The body's lines (UTF-8, without their line ends) as they come."""
        lines = Lines()
        while (data := self._next()) is not None:
            yield from lines.feed(data)
        yield from lines.rest()

    def read(self) -> bytes:
        """The rest of the body."""
        return b"".join(self.iter_bytes())


def _io(call: Callable[[], _T], timeout: float | None) -> _T:
    """``call()``, its failures as the SDK's transport errors."""
    try:
        return call()
    except TimeoutError as exc:
        raise WireTimeout(f"no answer within {timeout} s") from exc
    except (OSError, ValueError) as exc:
        raise WireError(f"bad exchange with the daemon ({exc})") from exc


class Wire:
    """A small pool of keep-alive connections to one daemon. Thread-safe; ``close()`` drops them all."""

    def __init__(self, config: ConnectionConfig) -> None:
        self._to = Endpoint.of(config.base_url, config.headers())
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    def _new(self, timeout: float | None) -> _Conn:
        try:
            sock = socket.create_connection((self._to.host, self._to.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._to.https:
                sock = default_ssl_context().wrap_socket(sock, server_hostname=self._to.host)
        except TimeoutError as exc:
            raise WireTimeout(f"no connection within {timeout} s") from exc
        except OSError as exc:
            raise WireError(f"cannot connect ({exc.strerror or exc})") from exc
        return _Conn(sock)

    def _take(self) -> _Conn | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.idle_ok():
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: _Conn, parser: Parser) -> None:
        """Pool the connection again if its answer was read to its end and the daemon keeps it alive, else close
        it."""
        if parser.done and parser.keep_alive and not conn.buf:
            with self._lock:
                if not self._closed and len(self._idle) < MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def request(
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
        """One request, its whole answer. ``body``: JSON; ``content``: raw bytes, or an iterable of them sent
        chunked as it yields; ``query``: ``?...`` already encoded; ``extra``: more header lines, each ending in
        CRLF; ``content_type``: instead of JSON for ``body``, octet-stream for ``content``. A reused connection
        the daemon closed meanwhile is retried once on a new one."""
        conn, parser = self._open(method, path, body, timeout, query, content, extra, content_type)
        parts = []
        try:  # the body read in place (no Streamed): this is every exec's and create's path
            while True:
                parts.append(parser.body())
                if parser.done:
                    break
                if not conn.fill():
                    parts.append(parser.body(eof=True))
                    break
        except TimeoutError as exc:
            conn.close()
            raise WireTimeout(f"no answer within {timeout} s") from exc
        except (OSError, ValueError) as exc:
            conn.close()
            raise WireError(f"bad exchange with the daemon ({exc})") from exc
        self._give_back(conn, parser)
        return Reply(parser.status, parser.headers, b"".join(parts))

    @contextmanager
    def stream(
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
    ) -> Iterator[Streamed]:
        """One request whose answer's body is read as it comes, inside the ``with`` block (the arguments are
        :meth:`request`'s)."""
        conn, parser = self._open(method, path, body, timeout, query, content, extra, content_type)
        try:
            yield Streamed(conn, parser, timeout)
        except BaseException:
            conn.close()
            raise
        self._give_back(conn, parser)

    def _open(
        self,
        method: str,
        path: str,
        body: bytes | None,
        timeout: float | None,
        query: str,
        content: Content,
        extra: bytes,
        content_type: str | None,
    ) -> tuple[_Conn, Parser]:
        """Send the request; the connection and a parser holding the answer's head."""
        raw, chunks = encode(
            method, self._to.prefix + path + query, self._to.fixed, body=body, content=content, extra=extra,
            content_type=content_type,
        )  # fmt: skip
        if chunks is None:  # a request that can be sent again: try an idle connection first
            conn = self._take()
            if conn is not None:
                try:
                    return conn, self._exchange(conn, raw, None, method, timeout, reused=True)
                except _Stale:
                    pass
        conn = self._new(timeout)
        return conn, self._exchange(conn, raw, chunks, method, timeout, reused=False)

    def _exchange(
        self, conn: _Conn, raw: bytes, chunks: Iterable[bytes] | None, method: str, timeout: float | None, *,
        reused: bool,
    ) -> Parser:  # fmt: skip
        parser = Parser(conn.buf, head_only=method == "HEAD")
        try:
            conn.sock.settimeout(timeout)
            failed = _send(conn, raw, chunks, parser, timeout)
            answered = _read_head(conn, parser)
        except TimeoutError as exc:
            conn.close()
            raise WireTimeout(f"no answer within {timeout} s") from exc
        except (OSError, ValueError) as exc:
            conn.close()
            raise WireError(f"bad exchange with the daemon ({exc})") from exc
        if answered:  # even after a failed write: the daemon may answer (an error) before taking a whole body
            if failed is not None:
                parser.keep_alive = False  # the request was cut short: the connection is out of step
            return parser
        conn.close()
        if reused and not conn.buf:
            raise _Stale
        raise WireError(f"the daemon closed the connection without an answer ({failed or 'no more bytes'})")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _send(
    conn: _Conn, raw: bytes, chunks: Iterable[bytes] | None, parser: Parser, timeout: float | None
) -> OSError | None:
    """Write the request (``chunks``: its body, chunked); a write the daemon broke off is returned, not raised, as
    is an answer that came before the whole body was sent (an error: the daemon will not read the rest)."""
    sock = conn.sock
    try:
        sock.sendall(raw)
        if chunks is not None:
            for data in chunks:
                if _answered_early(conn, parser, timeout):
                    return ConnectionAbortedError("the daemon answered before the whole body was sent")
                if data:
                    sock.sendall(chunk(data))
            sock.sendall(LAST_CHUNK)
    except (BrokenPipeError, ConnectionResetError) as exc:
        return exc
    return None


def _answered_early(conn: _Conn, parser: Parser, timeout: float | None) -> bool:
    """Whether the daemon answered (or closed) while the body is still being sent. Readable is not enough: over
    TLS the server's session tickets make the socket readable with no answer in them."""
    if not select.select([conn.sock], [], [], 0)[0]:
        return False
    conn.sock.settimeout(0)
    try:
        if not conn.fill():
            return True  # closed: stop sending, reading the answer tells the rest
    except (BlockingIOError, ssl.SSLWantReadError):
        return False  # TLS housekeeping, no application data
    finally:
        conn.sock.settimeout(timeout)
    return parser.parse_head()


def _read_head(conn: _Conn, parser: Parser) -> bool:
    """Read until the answer's head is parsed; False if the connection ended first."""
    try:
        while not parser.parse_head():
            if not conn.fill():
                return False
    except ConnectionResetError:
        return False
    return True


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
