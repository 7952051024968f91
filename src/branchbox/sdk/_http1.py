"""HTTP/1.1 for the SDK without I/O: request heads, an incremental response parser, the reply types and the
transport errors. The sync client (:mod:`branchbox.sdk._wire`, sockets) and the async one
(:mod:`branchbox.sdk._awire`, an asyncio protocol) feed it bytes; neither parses HTTP itself.

Why not httpx: docs/api.md measures it at 1.0 ms (sync) and 1.6 ms (async) per exec round trip on top of this path,
about half of the whole round trip, for what the SDK needs of HTTP (one daemon, keep-alive, JSON, streamed bodies
both ways, query strings). Why not h11: its state machine is a good part of that cost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote, urlsplit

MAX_HEAD = 65536
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a header value may hold a tab

# ------------------------------------------------------------------ errors


class WireError(Exception):
    """The daemon could not be reached or broke off the exchange (the SDK raises ``ConnectionError_`` for it)."""


class WireTimeout(WireError):
    """No connection or no answer within the request's timeout (the SDK raises ``TimeoutException``)."""


class InvalidRequest(WireError, ValueError):
    """A URL, path or header that cannot be sent as it is (a control character: header injection)."""


class _Stale(Exception):
    """A pooled connection was closed by the daemon before our request reached it (retried on a new one)."""


# ------------------------------------------------------------------ requests


def _param(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def query_string(params: Sequence[tuple[str, Any]]) -> str:
    """``?a=1&b=x%2Fy`` for ``params`` (booleans as true/false, None as empty), "" for none."""
    if not params:
        return ""
    return "?" + "&".join(f"{quote(k, safe='')}={quote(_param(v), safe='')}" for k, v in params)


def fixed_head(headers: dict[str, str]) -> bytes:
    """The header lines every request to one daemon carries (host, key...), checked once."""
    for key, value in headers.items():
        if _CONTROL.search(key) or _CONTROL_IN_VALUE.search(value):
            raise InvalidRequest(f"header {key!r} holds a control character: check the URL and API key")
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")


class Endpoint(NamedTuple):
    """Where a client connects and what every request to that daemon carries."""

    https: bool
    host: str
    port: int
    prefix: str  # the base URL's path, put before every request's
    fixed: bytes  # header lines every request carries (host, accept, user-agent, authorization)

    @classmethod
    def of(cls, base_url: str, headers: dict[str, str]) -> Endpoint:
        parts = urlsplit(base_url)
        https = parts.scheme == "https"
        fixed = fixed_head({**headers, "host": parts.netloc, "accept": "application/json"})
        return cls(
            https, parts.hostname or "127.0.0.1", parts.port or (443 if https else 80), parts.path.rstrip("/"), fixed
        )


def request_head(
    method: str, target: str, fixed: bytes, *, extra: bytes, content_type: str | None, length: int | None, body: bool
) -> bytes:
    """A request's head. ``body``: one follows, of ``length`` bytes or chunked (None); a POST/PUT/PATCH without
    one says ``content-length: 0``. ``extra``: more header lines, each ending in CRLF."""
    if _CONTROL.search(target) or " " in target:
        raise InvalidRequest(f"the request path {target!r} holds a space or control character")
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), fixed, extra]
    if body and content_type:
        lines.append(f"content-type: {content_type}\r\n".encode("latin-1"))
    if body and length is None:
        lines.append(b"transfer-encoding: chunked\r\n")
    elif body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: %d\r\n" % (length or 0))
    lines.append(b"\r\n")
    return b"".join(lines)


_S = TypeVar("_S")


def encode(
    method: str,
    target: str,
    fixed: bytes,
    *,
    body: bytes | None,
    content: bytes | _S | None,
    extra: bytes,
    content_type: str | None,
) -> tuple[bytes, _S | None]:
    """A request's bytes (its head, and its body when it is whole), and its body's pieces when they are to be
    streamed chunked (``content`` that is neither bytes nor None: an iterable). ``body``: JSON; ``content``:
    raw; ``content_type`` instead of either's."""
    pieces: _S | None = None
    payload, kind = body, "application/json"
    if body is None and content is not None:
        kind = "application/octet-stream"
        if isinstance(content, bytes | bytearray | memoryview):
            payload = bytes(content)
        else:
            pieces = content
    head = request_head(
        method,
        target,
        fixed,
        extra=extra,
        content_type=content_type or kind,
        length=None if pieces is not None else len(payload or b""),
        body=payload is not None or pieces is not None,
    )
    return (head + payload if payload is not None else head), pieces


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked request body (an empty ``data`` would end the body: skip it)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

# ------------------------------------------------------------------ responses


class Reply:
    """A finished response: status, headers (lower-case names), the whole body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(7)


class Parser:
    """One response, parsed as its bytes arrive: :meth:`feed` bytes, :meth:`parse_head` until it returns True,
    then :meth:`body` returns the body bytes decodable so far (each byte is parsed once, whatever the split points;
    a chunked body is de-chunked) until ``done``. Bytes past the response stay in ``buf`` (the next answer's).
    Raises ValueError on a malformed answer."""

    __slots__ = ("buf", "done", "head_only", "headers", "keep_alive", "left", "state", "status")

    def __init__(self, buf: bytearray, *, head_only: bool = False) -> None:
        self.buf = buf  # shared with the connection: what arrived and was not yet taken
        self.head_only = head_only
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.state = -1
        self.left = 0  # bytes left of the body (content-length) or of the current chunk
        self.done = False

    def feed(self, data: bytes) -> None:
        self.buf += data

    def parse_head(self) -> bool:
        """True once the head is parsed (status, headers, how the body is framed)."""
        if self.state >= 0:
            return True
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ValueError("response head too long")
            return False
        status_line, *lines = buf[:end].decode("latin-1").split("\r\n")
        del buf[: end + 4]
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        self.status = status = int(parts[1])
        headers = self.headers
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if self.head_only or status in (204, 304) or 100 <= status < 200:
            self.state, self.done = _DONE, True
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            self.left = int(headers["content-length"])
            if self.left < 0:
                raise ValueError("negative content-length")
            self.state = _LENGTH
            self.done = self.left == 0
        else:  # the body ends when the connection closes
            self.state, self.keep_alive = _UNTIL_CLOSE, False
        return True

    def body(self, *, eof: bool = False) -> bytes:
        """The body bytes that can be taken now (maybe none); ``eof``: the connection closed, which ends a body
        without a length and makes any other unfinished body an error."""
        buf = self.buf
        if self.state == _LENGTH:
            n = min(self.left, len(buf))
            out = bytes(buf[:n])
            del buf[:n]
            self.left -= n
            self.done = self.left == 0
        elif self.state == _UNTIL_CLOSE:
            out = bytes(buf)
            buf.clear()
            self.done = eof
        elif self.state == _DONE:
            return b""
        else:
            out = self._chunked()
        if eof and not self.done:
            raise ValueError("the daemon closed the connection in the middle of the body")
        return out

    def _chunked(self) -> bytes:
        buf = self.buf
        parts: list[bytes] = []
        while True:
            if self.state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("chunk size line too long")
                    break
                size = int(bytes(buf[:eol]).split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError("negative chunk size")
                del buf[: eol + 2]
                self.left = size
                self.state = _CHUNK_DATA if size else _TRAILERS
            elif self.state == _CHUNK_DATA:
                n = min(self.left, len(buf))
                if n == 0:
                    break
                parts.append(bytes(buf[:n]))
                del buf[:n]
                self.left -= n
                if self.left:
                    break
                self.state = _CHUNK_END
            elif self.state == _CHUNK_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError("a chunk does not end in CRLF")
                del buf[:2]
                self.state = _CHUNK_SIZE
            else:  # trailers: lines until an empty one
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEAD:
                        raise ValueError("trailer too long")
                    break
                del buf[: eol + 2]
                if eol == 0:
                    self.state, self.done = _DONE, True
                    break
        return b"".join(parts)


class Recut:
    """Body pieces as they come, re-cut to ``size`` bytes (the last one shorter); ``size`` None: as they come."""

    __slots__ = ("pending", "size")

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if self.size is None:
            return [data]
        self.pending += data
        out = []
        while len(self.pending) >= self.size:
            out.append(bytes(self.pending[: self.size]))
            del self.pending[: self.size]
        return out

    def rest(self) -> list[bytes]:
        return [bytes(self.pending)] if self.pending else []


class Lines:
    """A body's lines (UTF-8, ended by \\n; a \\r before it is dropped) as its pieces come."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self.pending = (self.pending + data).split(b"\n")
        return [line.removesuffix(b"\r").decode("utf-8") for line in lines]

    def rest(self) -> list[str]:
        return [self.pending.decode("utf-8")] if self.pending else []
