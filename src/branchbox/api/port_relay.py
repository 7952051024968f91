"""A minimal HTTP/1.1 relay for the port proxy: one TCP connection to the sandbox per request
(``Connection: close``), the request streamed out, the response's head parsed and its body streamed back.

Hand-written instead of an HTTP client library because the proxy only moves bytes: it needs no redirects,
cookies, pools or decoding, and skipping them halves the time a small request takes and lifts throughput
(see bench/net_bench.py). Handles Content-Length, chunked and read-to-close bodies, HEAD/204/304 without body,
and skips interim 1xx answers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

from starlette.types import Send

READ_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024
HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
        b"trailers", b"transfer-encoding", b"upgrade", b"expect", b"proxy-connection",
    }
)  # fmt: skip


class UpstreamError(Exception):
    """The sandbox's server broke the exchange (before or after the response started: see ``started``)."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


async def relay(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: AsyncIterator[bytes] | None,
    send: Send,
    *,
    connect_timeout: float,
    sock: socket.socket | None = None,
) -> None:
    """Send the request to host:port (over ``sock`` when given: connected already, and closed at the end), stream
    the answer to ``send``. Raises OSError/TimeoutError when the connection cannot be made (nothing was sent to
    the client), UpstreamError when it breaks later."""
    if sock is not None:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_HEAD)
    else:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
    try:
        await _send_request(writer, method, target, headers, body, host, port)
        await _relay_response(reader, send, head_only=method == "HEAD")
    finally:
        writer.close()


async def _send_request(
    writer: asyncio.StreamWriter,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: AsyncIterator[bytes] | None,
    host: str,
    port: int,
) -> None:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    has_host = False
    length: bytes | None = None
    for k, v in headers:
        lk = k.lower()
        if lk in HOP:
            continue
        if lk == b"host":
            has_host = True
        if lk == b"content-length":
            length = v
        lines.append(k + b": " + v)
    if not has_host:
        lines.append(f"host: {host}:{port}".encode())
    chunked = body is not None and length is None
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"connection: close")
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if body is not None:
            async for chunk in body:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
        await writer.drain()
    except OSError as exc:
        raise UpstreamError(f"sending the request failed: {exc}", started=False) from exc


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[bytes, bytes]]]:
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            raise UpstreamError(f"no valid response head: {exc!r}", started=False) from exc
        status_line, *header_lines = raw[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise UpstreamError(f"not an HTTP response: {status_line[:80]!r}", started=False)
        status = int(parts[1])
        headers = []
        for line in header_lines:
            k, sep, v = line.partition(b":")
            if sep:
                headers.append((k.strip(), v.strip()))
        if 100 <= status < 200 and status != 101:
            continue  # interim (100 Continue, 103 Early Hints): the final answer follows
        return status, headers


async def _relay_response(reader: asyncio.StreamReader, send: Send, *, head_only: bool) -> None:
    status, headers = await _read_head(reader)
    names = {k.lower(): v for k, v in headers}
    out = [(k.lower(), v) for k, v in headers if k.lower() not in HOP]
    await send({"type": "http.response.start", "status": status, "headers": out})
    try:
        if head_only or status in (204, 304):
            pass
        elif b"chunked" in names.get(b"transfer-encoding", b"").lower():
            await _chunked(reader, send)
        elif b"content-length" in names:
            await _counted(reader, send, int(names[b"content-length"]))
        else:
            while chunk := await reader.read(READ_SIZE):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (asyncio.IncompleteReadError, OSError, ValueError) as exc:
        raise UpstreamError(f"the response body broke off: {exc!r}", started=True) from exc
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _counted(reader: asyncio.StreamReader, send: Send, left: int) -> None:
    while left > 0:
        chunk = await reader.read(min(READ_SIZE, left))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _chunked(reader: asyncio.StreamReader, send: Send) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, dropped
                pass
            return
        await _counted(reader, send, size)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("bad chunk framing")
