"""The Connect protocol's JSON codec, as envd's clients speak it (the e2b SDK's ``connectrpc`` client and the
older ``e2b_connect`` one): just what a server of unary and server-streaming procedures needs.

* Unary: ``POST /<service>/<Method>``, ``Content-Type: application/json``, the request message as the body; the
  answer is the response message as JSON (200), or an error ``{"code", "message"}`` with the HTTP status of its
  code.
* Server streaming: ``Content-Type: application/connect+json``; the request body and every response message are
  enveloped (one flags byte, a 4-byte big-endian length, the JSON); the last envelope has flag ``0x02`` and holds
  ``{}`` or ``{"error": {"code", "message"}}``. The HTTP status is 200 whatever happens after the headers.
* ``Connect-Timeout-Ms`` is the client's deadline for the whole call.

Hand-written rather than on ``connectrpc``'s server (docs/e2b.md, "Why a hand-written Connect codec"): that
server dispatches to protobuf message classes generated from .proto files by ``protoc`` (grpcio-tools has one on
PyPI) and connectrpc's own generator plugin, so it would add protobuf, a code generation step and generated
modules to serve a facade that speaks the JSON codec only; the library is pre-1.0 and its generated interfaces
have changed between minor versions; envd's messages map onto branchbox's own dataclasses in a few lines each.
The cost: this module follows the Connect protocol's spec by hand (tested against the unmodified e2b SDK's own
connectrpc client, unary and streaming, errors and deadlines included).
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from branchbox.errors import BranchboxError

JSON = "application/json"
STREAM_JSON = "application/connect+json"
END_STREAM = 0x02
COMPRESSED = 0x01
MAX_MESSAGE = 16 * 1024 * 1024  # a request message (process start, file ops) is small; refuse bigger ones

# Connect code -> the HTTP status of a unary error (connectrpc.com/docs/protocol#error-codes)
STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


_BY_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    429: "resource_exhausted",
    501: "unimplemented",
    502: "unavailable",
    504: "deadline_exceeded",
}


class RpcError(Exception):
    """An error answered to the caller with a Connect code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def from_branchbox(exc: BranchboxError) -> RpcError:
    """The Connect error of a branchbox error, by its class."""
    code = exc.code
    if code == "file_exists":
        return RpcError("already_exists", exc.message)
    if code in ("invalid_state", "conflict"):
        return RpcError("failed_precondition", exc.message)
    if code in ("agent_disconnected", "sandbox_not_found"):
        # "was not found" is what the SDK reads as: the sandbox is not running any more
        return RpcError("unavailable", f"The sandbox was not found ({exc.message})")
    return RpcError(_BY_STATUS.get(exc.http_status, "internal"), exc.message)


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(data)) + data


def end_stream(error: RpcError | None = None) -> bytes:
    return envelope({} if error is None else {"error": error.body()}, END_STREAM)


def _decode_json(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RpcError("invalid_argument", f"the request message is not JSON ({exc})") from exc
    if not isinstance(message, dict):
        raise RpcError("invalid_argument", "the request message must be a JSON object")
    return message


def unary_request(body: bytes, encoding: str | None) -> dict[str, Any]:
    """The message of a unary request body (``Content-Encoding: gzip`` or none)."""
    if encoding and encoding != "identity":
        if encoding != "gzip":
            raise RpcError("unimplemented", f"content encoding {encoding!r} is not supported: send gzip or none")
        body = _gunzip(body)
    return _decode_json(body)


def stream_request(body: bytes, encoding: str | None) -> dict[str, Any]:
    """The one message of a server-streaming request: exactly one envelope."""
    if len(body) < 5:
        raise RpcError("invalid_argument", "the request body is not a Connect envelope (5-byte prefix missing)")
    flags, length = struct.unpack(">BI", body[:5])
    if length != len(body) - 5:
        raise RpcError("invalid_argument", f"the envelope says {length} bytes but {len(body) - 5} follow")
    data = body[5:]
    if flags & COMPRESSED:
        if encoding != "gzip":
            raise RpcError("unimplemented", f"message encoding {encoding!r} is not supported: send gzip or none")
        data = _gunzip(data)
    return _decode_json(data)


def _gunzip(data: bytes) -> bytes:
    try:
        d = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise RpcError("invalid_argument", f"the gzip body is corrupt ({exc})") from exc
    if len(d) > MAX_MESSAGE:
        raise RpcError("resource_exhausted", f"the request message is over {MAX_MESSAGE} bytes")
    return d


def timeout_s(value: str | None) -> float | None:
    """``Connect-Timeout-Ms`` in seconds (None: no deadline)."""
    if not value:
        return None
    if not value.isdigit() or len(value) > 10:
        raise RpcError("invalid_argument", f"Connect-Timeout-Ms must be an integer of up to 10 digits, not {value!r}")
    return int(value) / 1000.0 or None


def check_method(method: str) -> None:
    if method != "POST":
        raise RpcError("unimplemented", f"Connect calls are POST, not {method}")


async def stream_messages(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]], encoding: str | None
) -> AsyncIterator[dict[str, Any]]:
    """The messages of a client-streaming request body, each as soon as its envelope is complete."""
    buf = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RpcError("canceled", "the client went away")
        buf += message.get("body", b"")
        more = bool(message.get("more_body", False))
        while len(buf) >= 5:
            flags, length = struct.unpack(">BI", buf[:5])
            if length > MAX_MESSAGE:
                raise RpcError("resource_exhausted", f"a request message is over {MAX_MESSAGE} bytes")
            if len(buf) < 5 + length:
                break
            data, buf = buf[5 : 5 + length], buf[5 + length :]
            if flags & END_STREAM:
                return
            if flags & COMPRESSED:
                if encoding != "gzip":
                    raise RpcError(
                        "unimplemented", f"message encoding {encoding!r} is not supported: send gzip or none"
                    )
                data = _gunzip(data)
            yield _decode_json(data)
    if buf:
        raise RpcError("invalid_argument", "the request body ends inside an envelope")
