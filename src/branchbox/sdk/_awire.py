"""The async SDK's fast path for small JSON requests: keep-alive HTTP/1.1 on asyncio streams.

The async twin of :mod:`branchbox.sdk._wire`. A pool is shared by every ``AsyncSandbox`` of one event loop and
daemon (URL + key) and closed when the last of them closes, so a burst of creates reuses connections instead of
each opening its own httpx client and connection. Streams and requests with query parameters stay on httpx.
Failures raise the httpx exceptions the rest of the SDK maps to its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from urllib.parse import urlsplit

import httpx

from branchbox.sdk._config import ConnectionConfig, default_ssl_context
from branchbox.sdk._wire import Reply

MAX_IDLE = 64
_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Stale(Exception):
    """A pooled connection was closed by the daemon before our request."""


def _close(conn: _Conn) -> None:
    conn[1].close()


class AsyncWire:
    """Pooled keep-alive connections to one daemon, used from one event loop."""

    def __init__(self, config: ConnectionConfig) -> None:
        parts = urlsplit(config.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        head = {**config.headers(), "host": parts.netloc, "accept": "application/json"}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode("latin-1")
        self._idle: list[_Conn] = []
        self.users = 0

    async def _new(self) -> _Conn:
        ssl = default_ssl_context() if self._https else None
        return await asyncio.open_connection(self._host, self._port, ssl=ssl)

    def _take(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn[0].at_eof() and not conn[1].is_closing():
                return conn
            _close(conn)
        return None

    async def request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Reply:
        """One request. A reused connection the daemon closed meanwhile is retried once on a new one."""
        try:
            async with asyncio.timeout(timeout):
                conn = self._take()
                if conn is not None:
                    try:
                        return await self._exchange(conn, method, path, body, reused=True)
                    except _Stale:
                        pass
                try:
                    conn = await self._new()
                except OSError as exc:
                    raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
                return await self._exchange(conn, method, path, body, reused=False)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no answer within {timeout} s") from exc

    async def _exchange(self, conn: _Conn, method: str, path: str, body: bytes | None, *, reused: bool) -> Reply:
        reader, writer = conn
        lines = [f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._head]
        if body is not None:
            lines.append(b"content-type: application/json\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body or b""))
        lines += [b"\r\n", body or b""]
        done = False
        try:
            writer.write(b"".join(lines))
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if reused and not exc.partial:
                    raise _Stale from exc
                raise httpx.RemoteProtocolError("the daemon closed the connection without an answer") from exc
            status, headers = _parse_head(head)
            will_close = headers.get("connection", "").lower() == "close"
            if method == "HEAD" or status in (204, 304):
                content = b""
            elif "content-length" in headers:
                content = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                content = await _read_chunked(reader)
            else:
                content, will_close = await reader.read(), True
            done = True
        except (ConnectionResetError, BrokenPipeError) as exc:
            if reused:
                raise _Stale from exc
            raise httpx.RemoteProtocolError(f"the daemon closed the connection ({exc})") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(f"bad answer from the daemon ({exc!r})") from exc
        finally:
            if not done:
                _close(conn)  # failed or cancelled mid-exchange: the connection's state is unknown
        if will_close or len(self._idle) >= MAX_IDLE:
            _close(conn)
        else:
            self._idle.append(conn)
        return Reply(status, headers, content)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from our daemon: the empty line
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


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
