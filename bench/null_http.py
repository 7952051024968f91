"""The HTTP floor of the paired benchmark: a null daemon that answers the SDK's create and run requests with
canned JSON at once, in a process of its own (uvloop when installed, like the daemon; one write per answer).

The SDK against it pays what any HTTP API in another process pays on this machine: the client's own work, two
loopback round trips and the wake-ups of two processes, without any of the daemon's work. The gap between this
floor and the real daemon is the daemon's share; the gap between the in-process Manager and this floor is the
process boundary's.

Run as ``python null_http.py`` (prints the port once listening) or use :func:`null_daemon`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

_SANDBOX = {
    "sandbox_id": "0123456789abcdef0123",
    "template_id": "default",
    "template_digest": "0" * 64,
    "backend": "container",
    "state": "running",
    "metadata": {},
    "hostname": "bb-0123456789ab",
    "started_at": "2026-01-01T00:00:00Z",
    "end_at": "2026-01-01T00:05:00Z",
    "cpu": 1.0,
    "memory_mb": 128,
    "pids": 1024,
    "source": "warm",
    "timings": {"claim": 0.3, "store": 0.1, "total": 0.4},
    "error": None,
}
_RESULT = {"exit_code": 0, "stdout": "", "stderr": "", "signal": None, "duration_ms": 1.0}


def _answer(status: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
    return head + body


CREATED = _answer(b"201 Created", json.dumps(_SANDBOX).encode())
RAN = _answer(b"200 OK", json.dumps(_RESULT).encode())
GONE = b"HTTP/1.1 204 No Content\r\n\r\n"


class NullHttp(asyncio.Protocol):
    """Keep-alive HTTP/1.1 with content-length bodies: enough for the SDK's small JSON requests."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            method, path = head[0].split(b" ")[:2]
            answer = GONE if method == b"DELETE" else RAN if path.endswith(b"/commands") else CREATED
            self.transport.write(answer)


async def _serve() -> None:
    server = await asyncio.get_running_loop().create_server(NullHttp, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


@contextlib.contextmanager
def null_daemon() -> Iterator[str]:
    """Run the null daemon in a subprocess; yields its URL; stopped at the end, also on failure."""
    proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(_serve())
    except ImportError:
        asyncio.run(_serve())
