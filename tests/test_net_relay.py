"""The port proxy's HTTP relay against canned HTTP/1.1 servers on loopback: body framings, HEAD, 204, interim
1xx answers, request bodies, broken responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from branchbox.api.port_relay import UpstreamError, relay

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def canned(response: bytes, seen: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
            if b"content-length: " in head.lower():
                n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                seen.append(await reader.readexactly(n))
            elif b"transfer-encoding: chunked" in head.lower():
                seen.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(response)
        await writer.drain()
        writer.close()

    return handle


async def run(
    port: int, method: str = "GET", body: AsyncIterator[bytes] | None = None, headers: Any = ()
) -> tuple[int, dict[bytes, bytes], bytes]:
    messages: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        messages.append(msg)

    await relay("127.0.0.1", port, method, "/p?q=1", list(headers), body, send, connect_timeout=5)
    start = messages[0]
    assert messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in messages[1:])


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nhel\r\n2\r\nlo\r\n0\r\nT: 1\r\n\r\n",
            b"hello",
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil close", b"until close"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    ],
)
async def test_response_framings(response: bytes, body: bytes) -> None:
    server, port = await serve(canned(response))
    async with server:
        status, headers, got = await run(port)
    assert got == body
    assert status in (200, 201)
    assert b"transfer-encoding" not in headers  # the ASGI server frames the body itself


async def test_head_and_no_content_have_no_body() -> None:
    server, port = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"))
    async with server:
        status, headers, body = await run(port, "HEAD")
    assert (status, headers[b"content-length"], body) == (200, b"99", b"")
    server, port = await serve(canned(b"HTTP/1.1 204 No Content\r\n\r\n"))
    async with server:
        assert (await run(port, "DELETE"))[0] == 204


async def test_request_bodies_and_headers() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    seen: list[bytes] = []
    server, port = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seen))
    async with server:
        await run(port, "POST", chunks(), [(b"Content-Length", b"4"), (b"Expect", b"100-continue"), (b"X-A", b"1")])
        await run(port, "POST", chunks())
    head, data, head2, data2 = seen
    assert head.startswith(b"POST /p?q=1 HTTP/1.1\r\n")
    assert b"X-A: 1" in head and b"connection: close" in head and b"Expect" not in head
    assert data == b"abcd"
    assert b"transfer-encoding: chunked" in head2
    assert data2 == b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"


async def test_broken_responses() -> None:
    server, port = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"))
    async with server:
        with pytest.raises(UpstreamError) as exc:
            await run(port)
    assert exc.value.started
    server, port = await serve(canned(b"garbage\r\n\r\n"))
    async with server:
        with pytest.raises(UpstreamError) as exc:
            await run(port)
    assert not exc.value.started
    with pytest.raises(OSError):  # nothing listens: the caller answers 502 port_unreachable
        await run(port)
