"""Agent wire protocol, version 1: frame constants, encoders and an incremental parser.

Stdlib only and free of I/O: this module is copied into every sandbox next to the agent. A frame is a 9-byte
header ``!IBI`` (payload length, kind, channel id) followed by the payload. See docs/agent-protocol.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1

HEADER = struct.Struct("!IBI")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20  # 1 MiB
CHUNK_SIZE = 256 * 1024  # largest DATA chunk either side sends
INITIAL_WINDOW = 4 * 1024 * 1024  # DATA bytes a sender may have unacknowledged per call and direction
_U32 = struct.Struct("!I")


def not_runnable(program: str, err: int | None) -> tuple[int, bytes]:
    """What a shell answers when ``program`` cannot be executed (``err``: exec's errno): the exit code (127 not
    found, 126 otherwise) and the line for stderr."""
    if err == errno.ENOENT:
        return 127, f"branchbox: {program}: command not found\n".encode()
    return 126, f"branchbox: {program}: {os.strerror(err or errno.EACCES)}\n".encode()


# Frame kinds.
HELLO = 0
CALL = 1
RESULT = 2
EVENT = 3
DATA = 4
EOF = 5
CANCEL = 6
WINDOW = 7
KIND_NAMES = ("HELLO", "CALL", "RESULT", "EVENT", "DATA", "EOF", "CANCEL", "WINDOW")

# Streams (first payload byte of DATA and EOF).
STDIN = 0
STDOUT = 1
STDERR = 2

Frame = tuple[int, int, bytes]  # (kind, channel, payload)


class ProtocolError(Exception):
    """The byte stream is not a valid sequence of frames; the connection must be closed."""


def encode(kind: int, channel: int, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD} byte limit")
    return HEADER.pack(len(payload), kind, channel) + payload


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def encode_json(kind: int, channel: int, obj: Any) -> bytes:
    """A frame whose payload is ``obj`` as JSON."""
    return encode(kind, channel, dumps(obj))


def encode_data(channel: int, stream: int, data: bytes) -> bytes:
    """A DATA frame; ``data`` must be at most ``MAX_PAYLOAD - 1`` bytes."""
    if len(data) >= MAX_PAYLOAD:
        raise ProtocolError(f"DATA chunk of {len(data)} bytes exceeds the {MAX_PAYLOAD - 1} byte limit")
    return HEADER.pack(len(data) + 1, DATA, channel) + bytes((stream,)) + data


def encode_eof(channel: int, stream: int) -> bytes:
    return HEADER.pack(1, EOF, channel) + bytes((stream,))


def encode_window(channel: int, credit: int) -> bytes:
    return HEADER.pack(4, WINDOW, channel) + _U32.pack(credit)


def encode_cancel(channel: int) -> bytes:
    return HEADER.pack(0, CANCEL, channel)


def decode_json(payload: bytes) -> Any:
    """Parse a JSON payload, raising ProtocolError when it is not JSON."""
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON payload: {exc}") from exc


def decode_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    credit: int = _U32.unpack(payload)[0]
    return credit


def split_stream(payload: bytes) -> tuple[int, bytes]:
    """Stream id and bytes of a DATA or EOF payload."""
    if not payload:
        raise ProtocolError("DATA/EOF payload lacks its stream byte")
    if payload[0] > STDERR:
        raise ProtocolError(f"unknown stream {payload[0]}")
    return payload[0], payload[1:]


class FrameParser:
    """Incremental parser: ``feed`` bytes as they arrive, get back every complete frame."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        size = len(buf)
        unpack = HEADER.unpack_from
        while size - pos >= HEADER_SIZE:
            length, kind, channel = unpack(buf, pos)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD} byte limit")
            if kind > WINDOW:
                raise ProtocolError(f"unknown frame kind {kind}")
            end = pos + HEADER_SIZE + length
            if end > size:
                break
            frames.append((kind, channel, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames


@contextlib.contextmanager
def short_unix_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A path for bind()/connect() of an AF_UNIX socket that fits the 108-byte limit however deep ``path`` is:
    ``/proc/self/fd/<dir fd>/<name>`` through an O_PATH descriptor of the parent directory."""
    full = os.fspath(path)
    if len(full.encode()) < 100:
        yield full
        return
    parent, name = os.path.split(full)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


class VsockAddress(NamedTuple):
    """Where an agent listens on AF_VSOCK (a microVM on a host with vhost-vsock); text form ``CID:PORT``."""

    cid: int
    port: int

    def __str__(self) -> str:
        return f"{self.cid}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> VsockAddress:
        cid, _, port = text.partition(":")
        return cls(int(cid), int(port))
