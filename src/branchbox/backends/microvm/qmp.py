"""A small asyncio client of QEMU's QMP (JSON lines over a unix socket): commands, events, fd passing.

One command is in flight at a time (QMP answers in order); events are queued and waited for with
:meth:`QMP.wait_event`. Errors QEMU returns become :class:`~branchbox.errors.BackendError` with QEMU's class and
description; a closed socket is :class:`QMPClosedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from branchbox.agent import wire
from branchbox.errors import BackendError, TimeoutError_

Event = dict[str, Any]


class QMPClosedError(BackendError):
    """The QMP socket closed (QEMU exited or another client holds it)."""


class QMP:
    """Create with :meth:`connect`; close with :meth:`aclose`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._lock = asyncio.Lock()
        self._events: list[Event] = []
        self._event_waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        self._reply: asyncio.Future[dict[str, Any]] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._greeting: asyncio.Future[dict[str, Any]] = self._loop.create_future()

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 10.0) -> QMP:
        """Connect (QEMU may still be starting: the socket is bound by the caller) and negotiate capabilities."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            with wire.short_unix_path(path) as p:
                await asyncio.wait_for(loop.sock_connect(sock, p), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise BackendError(f"cannot connect to QMP at {path}: {exc!r}") from exc
        qmp = cls(sock)
        try:
            async with asyncio.timeout(timeout):
                await qmp._greeting
                await qmp.execute("qmp_capabilities")
        except TimeoutError:
            await qmp.aclose()
            raise TimeoutError_(f"QEMU did not answer on {path} within {timeout} s") from None
        except BaseException:
            await qmp.aclose()
            raise
        return qmp

    # -- reading -----------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(QMPClosedError("QMP connection closed (QEMU exited?)"))
            return
        self._buf += data
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.strip():
                self._dispatch(json.loads(line))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "QMP" in msg:
            if not self._greeting.done():
                self._greeting.set_result(msg)
        elif "event" in msg:
            for i, (pred, fut) in enumerate(self._event_waiters):
                if not fut.done() and pred(msg):
                    fut.set_result(msg)
                    del self._event_waiters[i]
                    return
            self._events.append(msg)
            del self._events[:-64]  # keep the recent ones for late waiters
        elif self._reply is not None and not self._reply.done():
            self._reply.set_result(msg)

    def _close(self, exc: BaseException) -> None:
        if self._closed.done():
            return
        self._closed.set_result(None)
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        futs = [f for _, f in self._event_waiters]
        if self._reply is not None:
            futs.append(self._reply)
        if not self._greeting.done():
            futs.append(self._greeting)
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._event_waiters.clear()

    # -- API ---------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> Any:
        """Run one command; ``fd`` is passed along with it (SCM_RIGHTS), for ``getfd``."""
        if self.closed:
            raise QMPClosedError(f"QMP is closed; cannot run {command}")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        async with self._lock:
            self._reply = self._loop.create_future()
            if fd is not None:
                socket.send_fds(self._sock, [data], [fd])
            else:
                await self._loop.sock_sendall(self._sock, data)
            reply = await self._reply
        if "error" in reply:
            err = reply["error"]
            raise BackendError(f"QEMU {command}: {err.get('class')}: {err.get('desc')}", qmp_class=err.get("class"))
        return reply.get("return")

    async def wait_event(self, pred: Callable[[Event], bool], *, timeout: float) -> Event:
        """The first event (queued or future) for which ``pred`` is true."""
        for i, ev in enumerate(self._events):
            if pred(ev):
                del self._events[i]
                return ev
        if self.closed:
            raise QMPClosedError("QMP is closed")
        fut: asyncio.Future[Event] = self._loop.create_future()
        self._event_waiters.append((pred, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError_(f"QEMU sent no matching event within {timeout} s") from None
        finally:
            if (pred, fut) in self._event_waiters:
                self._event_waiters.remove((pred, fut))

    def drop_events(self) -> None:
        self._events.clear()

    async def aclose(self) -> None:
        self._close(QMPClosedError("QMP closed by this client"))
