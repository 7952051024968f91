"""The daemon's HTTP protocol (daemon/http_front.py) over raw sockets: the hot routes answered without ASGI keep
HTTP/1.1's semantics (keep-alive, pipelining, connection: close, HTTP/1.0) and hand anything unusual to the app."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from branchbox.daemon.http_front import parse_plain
from tests.conftest import DaemonProc


class Conn:
    """One raw HTTP/1.1 connection; responses read by content-length (chunked ones are not expected here)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], Any]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"closed before a response head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert "transfer-encoding" not in headers
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            assert self._fill(), "closed mid-body"
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, json.loads(body) if body else None

    def closed_by_peer(self) -> bool:
        return self.buf == b"" and not self._fill()

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, body: Any = None, *, version: str = "1.1", extra: str = "") -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/{version}\r\nhost: localhost\r\n{extra}"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


@pytest.mark.root
def test_hot_routes_keep_http_semantics(daemon: DaemonProc) -> None:
    assert '"http": "httptools+fast-path"' in daemon.log_path.read_text()  # this protocol is what serves
    c = Conn(daemon.port)
    try:
        c.send(request("POST", "/v1/sandboxes", {"metadata": {"front": "1"}}))
        status, headers, created = c.response()
        assert status == 201, created
        assert headers["content-type"] == "application/json"
        assert "date" in headers  # uvicorn's default headers, as on every other route
        sid = created["sandbox_id"]
        run = request("POST", f"/v1/sandboxes/{sid}/commands", {"cmd": "echo $((6*7))"})
        c.send(run)
        assert c.response()[2]["stdout"] == "42\n"
        # a route of the app (ASGI) and hot routes again, on the same kept-alive connection
        c.send(request("GET", f"/v1/sandboxes/{sid}/commands"))
        assert c.response()[0] == 200
        c.send(request("GET", f"/v1/sandboxes/{sid}"))
        assert c.response()[2]["sandbox_id"] == sid
        # pipelined: a hot request, an app request and a hot one in one write; answers in order
        c.send(run + request("GET", "/health") + request("POST", f"/v1/sandboxes/{sid}/commands", {"cmd": "echo b"}))
        assert c.response()[2]["stdout"] == "42\n"
        assert c.response()[2] == {"status": "ok"}
        assert c.response()[2]["stdout"] == "b\n"
        # errors of the fast path itself, still kept alive
        c.send(request("GET", "/v1/sandboxes/nope"))
        status, _, err = c.response()
        assert (status, err["error"]["code"]) == (404, "sandbox_not_found")
        c.send(request("POST", f"/v1/sandboxes/{sid}/commands", {"cmd": "true"}, extra="connection: close\r\n"))
        status, headers, _ = c.response()
        assert (status, headers.get("connection")) == (200, "close")
        assert c.closed_by_peer()
    finally:
        c.close()
    old = Conn(daemon.port)  # HTTP/1.0 (no keep-alive): answered, then closed
    try:
        old.send(request("GET", f"/v1/sandboxes/{sid}", version="1.0"))
        status, headers, got = old.response()
        assert (status, got["sandbox_id"], headers.get("connection")) == (200, sid, "close")
        assert old.closed_by_peer()
    finally:
        old.close()
    metrics = Conn(daemon.port)
    try:
        metrics.send(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        while b'route="/v1/sandboxes/{sandbox_id}/commands",status="200"} 4.0' not in metrics.buf:
            assert metrics._fill(), metrics.buf.decode()[-2000:]
    finally:
        metrics.close()


@pytest.mark.root
def test_unusual_hot_requests_go_to_the_app(daemon: DaemonProc) -> None:
    c = Conn(daemon.port)
    try:
        c.send(request("POST", "/v1/sandboxes", {}))
        sid = c.response()[2]["sandbox_id"]
        base = f"/v1/sandboxes/{sid}/commands"
        c.send(request("POST", base, {"cmd": []}))  # fails validation: FastAPI's 400 and message
        status, _, err = c.response()
        assert (status, err["error"]["code"]) == (400, "bad_request")
        assert "cmd" in err["error"]["message"]
        big = "x" * 200_000  # above uvicorn's read buffer limit: streamed to the app instead
        c.send(request("POST", base, {"cmd": "wc -c", "stdin": big}))
        assert c.response()[2]["stdout"].strip() == "200000"
        body = json.dumps({"cmd": "cat", "stdin": "chunked"}).encode()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        c.send(
            f"POST {base} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
            + chunked
        )
        assert c.response()[2]["stdout"] == "chunked"
        c.send(request("POST", base, {"cmd": "sleep 30", "background": True}))  # the app's route
        assert c.response()[2]["background"] is True
        c.send(request("POST", base, {"cmd": "echo still in step"}))
        assert c.response()[2]["stdout"] == "still in step\n"
    finally:
        c.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/sandboxes/abc HTTP/1.1\r\nhost: localhost\r\n\r\n",
        b"GET /v1/sandboxes/abc?x=1 HTTP/1.1\r\n\r\n",
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/sandboxes HTTP/1.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ],
)
def test_plain_requests_are_parsed_here(raw: bytes) -> None:
    parsed = parse_plain(raw)
    assert parsed is not None
    request, path = parsed
    assert path.startswith("/v1/sandboxes")
    assert "?" not in path
    assert all(name == name.lower() for name, _ in request.scope["headers"])
    assert request.keep_alive is (b"connection: close" not in raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/sandboxes/abc HTTP/1.1\r\nhost: localhost\r\n",  # head not complete yet
        b"POST /v1/sandboxes HTTP/1.1\r\ncontent-length: 5\r\n\r\n{}",  # body not complete yet
        b"POST /v1/sandboxes HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n",  # pipelined
        b"POST /v1/sandboxes HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/sandboxes HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
        b"POST /v1/sandboxes HTTP/1.1\r\ncontent-length: +0\r\n\r\n",
        b"POST /v1/sandboxes HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
        b"GET /v1/sandboxes/abc HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        b"GET /v1/sandboxes/a%62c HTTP/1.1\r\n\r\n",  # escapes: httptools and uvicorn unquote them
        b"GET /v1/sandboxes/abc HTTP/1.0\r\n\r\n",
        b"PUT /v1/sandboxes/abc HTTP/1.1\r\n\r\n",
        b"GET /v1/sandboxes/abc HTTP/1.1\r\nbad name: x\r\n\r\n",
        b"GET /v1/sandboxes/abc HTTP/1.1\r\nx: a\r\n folded\r\n\r\n",
        b"GET /v1/sandboxes/abc HTTP/1.1\r\nx: \xff\r\n\r\n",
        b"GET /v1/sandboxes/abc HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",  # a GET with a body
        b"\r\nGET /v1/sandboxes/abc HTTP/1.1\r\n\r\n",
    ],
)
def test_anything_else_is_left_to_httptools(raw: bytes) -> None:
    assert parse_plain(raw) is None
