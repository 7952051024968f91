"""The virtio-serial transport: sessions of the protocol over a character device (a microVM's port)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
from collections.abc import Mapping

from . import wire
from .protocol import Connection, Method
from .supervise import Agent


class CharDevice(asyncio.Transport):
    """Sessions over a character device (a virtio-serial port): one stream that exists while the host is connected.

    A port can be opened once and reads EOF while the host side is disconnected. On EOF the session ends (its
    calls end as on a lost connection) and reading stops; the port is switched to ``O_ASYNC``, whose SIGIO the
    kernel sends when the host connects again (or data arrives), so waiting for the host costs nothing. The host
    opens every session with a HELLO frame, answered with HELLO (the agent cannot see a quick reconnect, a
    memory snapshot restored in a new VM, or a new host process on the same stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, agent: Agent, methods: Mapping[str, Method]) -> None:
        super().__init__()
        self.loop = loop
        self.agent = agent
        self.methods = methods
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        self.out = bytearray()
        self.conn: Connection | None = None
        self.reading = False
        self.writing = False
        loop.add_signal_handler(signal.SIGIO, self.on_sigio)
        self.start_reading()

    def _async(self, on: bool) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC))

    def start_reading(self) -> None:
        self._async(False)
        self.reading = True
        self.conn = Connection(self.agent, self.methods, host_starts=True)
        self.conn.connection_made(self)
        self.loop.add_reader(self.fd, self.on_readable)

    def end_session(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        self.out.clear()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.connection_lost(None)

    def wait_host(self) -> None:
        self.end_session()
        self._async(True)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not any(ev & select.POLLHUP for _, ev in poller.poll(0)):
            self.start_reading()  # the host came back before O_ASYNC was on

    def on_sigio(self) -> None:
        if not self.reading:
            self.start_reading()

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, wire.CHUNK_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.wait_host()
        elif self.conn is not None:
            self.conn.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.reading:
            return  # no host: the session is gone, its output with it
        self.out += data
        if not self.writing:
            self.flush()

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out)
            except BlockingIOError:
                break
            except OSError:
                self.wait_host()
                return
            del self.out[:n]
        if self.out and not self.writing:
            self.loop.add_writer(self.fd, self.flush)  # the host is slow (or away): resume when writable
            self.writing = True
        elif not self.out and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False

    def abort(self) -> None:
        """A protocol error: drop the session and keep reading; the host's next HELLO starts a new one."""
        self.end_session()
        self.start_reading()

    def close(self) -> None:
        self.abort()

    def is_closing(self) -> bool:
        return False
