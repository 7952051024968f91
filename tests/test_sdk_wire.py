"""The SDK's one HTTP client stack (``_http1`` parsing, ``_wire`` sync sockets, ``_awire`` asyncio) against a real
HTTP/1.1 server on loopback that can misbehave: query strings, bodies streamed both ways, flow control, an answer
that comes before the upload ends, timeouts and malformed answers, each in both flavours. The user-level paths
(files, templates, images through a real daemon) are in test_sdk.py and the feature tests."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from branchbox.sdk import BadRequestError, ConnectionError_, TimeoutException
from branchbox.sdk import _awire as awire_mod
from branchbox.sdk import _requests as rq
from branchbox.sdk._async_http import _AsyncHttp
from branchbox.sdk._config import ConnectionConfig
from branchbox.sdk._http1 import InvalidRequest, WireError, WireTimeout, fixed_head, query_string
from branchbox.sdk._sync_http import _Http
from branchbox.sdk._wire import Wire

PIECE = 65536


def _pattern(n: int) -> bytes:
    block = bytes(range(256)) * (PIECE // 256)
    return (block * (n // PIECE + 1))[:n]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Paths: ``/echo`` (what came: path, headers, body size and hash; chunked bodies decoded by hand),
    ``/bytes/N`` (N bytes, chunked, in 64 KiB chunks), ``/length/N`` (N bytes with a content-length),
    ``/lines`` (lines cut across chunks), ``/early`` (413 before reading the body, then close), ``/slow``
    (answers after 3 s), ``/bad-chunk`` (a chunk size that is not hex)."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[set[tuple[str, int]]] = set()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(self, status: int, body: bytes, *, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        if close:
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self, parts: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for part in parts:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def _answer(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test): nothing to report
            self.close_connection = True

    def _route(self) -> None:
        type(self).connections.add(self.client_address)
        path = urlsplit(self.path).path
        if path == "/early":  # answers first, gives the client a moment to see it, then closes unread
            self._send(413, b'{"code":"payload_too_large","message":"too big"}', close=True)
            self.wfile.flush()
            time.sleep(1)
            return
        if path == "/slow":
            time.sleep(3)
            self._send(200, b"{}")
            return
        if path == "/bad-chunk":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"zz\r\nxx\r\n0\r\n\r\n")
            return
        body = self._read_body()
        if path == "/echo":
            got = {
                "target": self.path,
                "method": self.command,
                "content-type": self.headers.get("content-type"),
                "transfer-encoding": self.headers.get("transfer-encoding"),
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
            self._send(200, json.dumps(got).encode())
        elif path.startswith("/bytes/"):
            data = _pattern(int(path.rsplit("/", 1)[1]))
            self._chunked([data[i : i + PIECE] for i in range(0, len(data), PIECE)])
        elif path.startswith("/length/"):
            self._send(200, _pattern(int(path.rsplit("/", 1)[1])))
        elif path == "/lines":
            self._chunked([b"a\r", b"\nb\n", b"c", b"\n\n", "é".encode()[:1], "é".encode()[1:] + b"\nlast"])

    do_GET = do_POST = do_PUT = _answer


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections = set()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def _config(url: str, request_timeout: float = 10.0) -> ConnectionConfig:
    return ConnectionConfig.resolve(base_url=url, env={}, request_timeout=request_timeout)


QUERY = [("path", "/a b&c=d?#%"), ("flag", True), ("off", False), ("none", None), ("n", 3)]
WANT_QUERY = "?path=%2Fa%20b%26c%3Dd%3F%23%25&flag=true&off=false&none=&n=3"


def _check_query(echo: dict[str, Any]) -> None:
    assert echo["target"] == "/echo" + WANT_QUERY
    parsed = parse_qs(urlsplit(echo["target"]).query, keep_blank_values=True)
    assert parsed == {"path": ["/a b&c=d?#%"], "flag": ["true"], "off": ["false"], "none": [""], "n": ["3"]}


# ------------------------------------------------------------------ sync


def test_sync_query_strings_and_bodies_both_ways(server: str) -> None:
    wire = Wire(_config(server))
    try:
        _check_query(wire.request("GET", "/echo", None, 10, query=query_string(QUERY)).json())
        data = _pattern(8 << 20)
        consumed = []

        def pieces() -> Iterator[bytes]:
            for i in range(0, len(data), PIECE):
                consumed.append(i)
                yield data[i : i + PIECE]
            yield b""  # an empty piece is skipped, not taken for the end of the body

        echo = wire.request("PUT", "/echo", None, 30, content=pieces()).json()
        assert (echo["size"], echo["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert (echo["transfer-encoding"], echo["content-type"]) == ("chunked", "application/octet-stream")
        echo = wire.request("PUT", "/echo", None, 30, content=b"xyz").json()  # bytes: one write with its length
        assert (echo["size"], echo["transfer-encoding"]) == (3, None)
        echo = wire.request("POST", "/echo", b'{"a":1}', 30).json()
        assert (echo["size"], echo["content-type"]) == (7, "application/json")

        for path in ("/bytes/", "/length/"):  # chunked and with a length: read as it comes, re-cut to the size
            size = (32 << 20) + 5
            with wire.stream("GET", f"{path}{size}", None, 30) as resp:
                assert resp.status_code == 200
                sizes, digest = [], hashlib.sha256()
                for part in resp.iter_bytes(1 << 20):
                    sizes.append(len(part))
                    digest.update(part)
            assert sizes == [1 << 20] * 32 + [5]
            assert digest.hexdigest() == hashlib.sha256(_pattern(size)).hexdigest()
        with wire.stream("GET", "/lines", None, 10) as resp:
            assert list(resp.iter_lines()) == ["a", "b", "c", "", "é", "last"]
        assert resp._conn in wire._idle  # a stream read to its end gives its connection back

        with wire.stream("GET", f"/bytes/{32 << 20}", None, 30) as resp:
            next(resp.iter_bytes())  # left early: the rest of the body is not read, the connection is closed
        assert resp._conn not in wire._idle
        assert resp._conn.sock.fileno() == -1
        assert wire.request("GET", "/echo", None, 10).status_code == 200
    finally:
        wire.close()


def test_sync_an_answer_before_the_upload_ends_is_the_answer(server: str) -> None:
    """A daemon that refuses an upload (413) answers and closes before reading it: the caller gets the answer,
    not a broken pipe, and the rest of the body is not read from its source."""
    wire = Wire(_config(server))
    consumed = []

    def pieces() -> Iterator[bytes]:
        for i in range(1024):  # 64 MiB
            consumed.append(i)
            yield _pattern(PIECE)

    try:
        reply = wire.request("PUT", "/early", None, 30, content=pieces())
        assert (reply.status_code, reply.json()["code"]) == (413, "payload_too_large")
        assert len(consumed) < 1024
        assert wire.request("GET", "/echo", None, 10).status_code == 200  # the pool is fine afterwards
    finally:
        wire.close()


def test_sync_timeouts_bad_answers_and_bad_requests(server: str) -> None:
    wire = Wire(_config(server))
    try:
        with pytest.raises(WireTimeout):
            wire.request("GET", "/slow", None, 0.3)
        with pytest.raises(WireError, match="bad"), wire.stream("GET", "/bad-chunk", None, 10) as resp:
            resp.read()
        with pytest.raises(InvalidRequest):
            wire.request("GET", "/x\r\nInjected: 1", None, 10)
    finally:
        wire.close()
    http = _Http(_config(server, request_timeout=0.3))  # what a user sees: the SDK's own errors
    try:
        with pytest.raises(TimeoutException, match="request_timeout"):
            http.send(rq.Req("GET", "/slow"))
        with pytest.raises(ConnectionError_), http.stream(rq.Req("GET", "/bad-chunk")) as resp:
            resp.read()
        with pytest.raises(BadRequestError, match="control character"):  # refused before anything is sent
            http.send(rq.Req("GET", "/x\nHost: elsewhere"))
    finally:
        http.close()
    assert fixed_head({"x-a": "tab\tis fine"}) == b"x-a: tab\tis fine\r\n"
    for bad in ({"x-a": "line\r\nx-b: injected"}, {"x\na": "1"}, {"x-a": "nul\x00"}):
        with pytest.raises(InvalidRequest):
            fixed_head(bad)


# ------------------------------------------------------------------ async


async def test_async_query_strings_and_bodies_both_ways(server: str) -> None:
    config = _config(server)
    wire = awire_mod.acquire(config)
    try:
        _check_query((await wire.request("GET", "/echo", None, 10, query=query_string(QUERY))).json())
        data = _pattern(8 << 20)

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(data), PIECE):
                yield data[i : i + PIECE]
            yield b""

        echo = (await wire.request("PUT", "/echo", None, 30, content=pieces())).json()
        assert (echo["size"], echo["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert echo["transfer-encoding"] == "chunked"
        echo = (await wire.request("PUT", "/echo", None, 30, content=b"xyz")).json()
        assert (echo["size"], echo["transfer-encoding"]) == (3, None)

        for path in ("/bytes/", "/length/"):
            size = (32 << 20) + 5
            async with wire.stream("GET", f"{path}{size}", None, 30) as resp:
                sizes, digest = [], hashlib.sha256()
                async for part in resp.aiter_bytes(1 << 20):
                    sizes.append(len(part))
                    digest.update(part)
            assert sizes == [1 << 20] * 32 + [5]
            assert digest.hexdigest() == hashlib.sha256(_pattern(size)).hexdigest()
        async with wire.stream("GET", "/lines", None, 10) as resp:
            assert [line async for line in resp.aiter_lines()] == ["a", "b", "c", "", "é", "last"]

        # a slow reader: the connection stops reading while 1 MiB waits, so memory stays bounded
        paused, most = False, 0
        async with wire.stream("GET", f"/bytes/{16 << 20}", None, 30) as resp:
            conn = resp._conn
            got = 0
            async for part in resp.aiter_bytes():
                got += len(part)
                await asyncio.sleep(0.002)
                paused |= conn.reading_paused
                most = max(most, len(conn.buf))
        assert got == 16 << 20
        assert paused
        assert most <= awire_mod.HIGH_WATER + (1 << 20)

        assert resp._conn in wire._idle  # a stream read to its end gives its connection back
        async with wire.stream("GET", f"/bytes/{32 << 20}", None, 30) as resp:
            await resp.aiter_bytes().__anext__()  # left early: its connection is closed, not pooled
        assert resp._conn not in wire._idle
        assert resp._conn.closed
        assert (await wire.request("GET", "/echo", None, 10)).status_code == 200
    finally:
        awire_mod.release(config, wire)


async def test_async_an_answer_before_the_upload_ends_is_the_answer(server: str) -> None:
    config = _config(server)
    wire = awire_mod.acquire(config)
    consumed = []

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(1024):  # 64 MiB
            consumed.append(i)
            yield _pattern(PIECE)

    try:
        reply = await wire.request("PUT", "/early", None, 30, content=pieces())
        assert (reply.status_code, reply.json()["code"]) == (413, "payload_too_large")
        assert len(consumed) < 1024
        async with wire.stream("PUT", "/early", None, 30, content=pieces()) as resp:
            assert resp.status_code == 413
        assert (await wire.request("GET", "/echo", None, 10)).status_code == 200
    finally:
        awire_mod.release(config, wire)


async def test_async_timeouts_bad_answers_and_bad_requests(server: str) -> None:
    config = _config(server)
    wire = awire_mod.acquire(config)
    try:
        with pytest.raises(WireTimeout):
            await wire.request("GET", "/slow", None, 0.3)
        with pytest.raises(WireError, match="bad"):
            async with wire.stream("GET", "/bad-chunk", None, 10) as resp:
                await resp.aread()
        with pytest.raises(InvalidRequest):
            await wire.request("GET", "/x\r\nInjected: 1", None, 10)
    finally:
        awire_mod.release(config, wire)
    http = _AsyncHttp(_config(server, request_timeout=0.3))
    try:
        with pytest.raises(TimeoutException, match="request_timeout"):
            await http.send(rq.Req("GET", "/slow"))
        with pytest.raises(ConnectionError_):
            async with http.stream(rq.Req("GET", "/bad-chunk")) as resp:
                await resp.aread()
    finally:
        await http.aclose()
