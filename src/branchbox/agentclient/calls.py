"""The client side of the agent protocol: the connection (frame parsing, the call table, write flow control)
and the calls in flight on it (a plain call, a foreground exec, a streamed process, a directory listing)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

from branchbox.agent import wire
from branchbox.errors import (
    AgentDisconnectedError,
    AgentError,
    BranchboxError,
    error_from_code,
)

ACK_EVERY = wire.INITIAL_WINDOW // 4


def agent_error(body: Mapping[str, Any]) -> BranchboxError:
    err = body.get("error")
    if not isinstance(err, dict):
        return AgentError(f"malformed RESULT from the agent: {body!r}")
    details = err.get("details")
    return error_from_code(
        str(err.get("code", "internal")),
        str(err.get("message", "")),
        **(details if isinstance(details, dict) else {}),
    )


class Call:
    """One call in flight: receives the frames of its channel; RESULT resolves ``future``."""

    __slots__ = ("channel", "conn", "credit", "credit_waiter", "done", "future", "unacked", "window")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.channel = conn.register(self)
        self.future: asyncio.Future[Any] = conn.loop.create_future()
        self.credit = wire.INITIAL_WINDOW  # DATA bytes we may still send the agent
        self.credit_waiter: asyncio.Future[None] | None = None
        self.done = False
        self.unacked = 0
        self.window = wire.INITIAL_WINDOW  # DATA bytes the agent may still send us (checked on receipt)

    def on_data(self, stream: int, data: bytes) -> None:
        """Agent output (ignored unless overridden)."""

    def on_event(self, event: Any) -> None:
        """EVENT frame (ignored unless overridden)."""

    def on_result(self, body: Any) -> None:
        if not isinstance(body, dict):
            self.fail(AgentError(f"malformed RESULT from the agent: {body!r}"))
        elif "error" in body:
            self.fail(agent_error(body))
        else:
            self.finish(body.get("result"))

    def finish(self, result: Any) -> None:
        self.done = True
        if not self.future.done():
            self.future.set_result(result)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self.done = True
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # whoever awaits still gets it; nobody may (a dropped handle)
        self._wake()

    def on_window(self, credit: int) -> None:
        self.credit += credit
        self._wake()

    def _wake(self) -> None:
        waiter = self.credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def received(self, n: int) -> None:
        """``n`` bytes of DATA arrived: an agent that sends beyond the credit we granted breaks the protocol."""
        self.window -= n
        if self.window < 0:
            raise wire.ProtocolError(f"the agent sent DATA beyond its window on channel {self.channel}")

    def ack(self, n: int) -> None:
        """We consumed ``n`` bytes of the agent's DATA: return credit in batches."""
        self.unacked += n
        if self.unacked >= ACK_EVERY and not self.done:
            self.window += self.unacked
            self.conn.write(wire.encode_window(self.channel, self.unacked))
            self.unacked = 0

    async def send_stream(self, stream: int, data: bytes) -> None:
        """Send DATA within the agent's credit and the transport's buffer limits."""
        view = memoryview(data)
        while view and not self.done:
            while self.credit <= 0 and not self.done:
                self.credit_waiter = self.conn.loop.create_future()
                await self.credit_waiter
                self.credit_waiter = None
            if self.done:
                break
            n = min(len(view), self.credit, wire.CHUNK_SIZE)
            self.credit -= n
            self.conn.write(wire.encode_data(self.channel, stream, bytes(view[:n])))
            view = view[n:]
            await self.conn.drain()

    def cancel(self) -> None:
        """Tell the agent to stop this call and forget it locally."""
        if not self.done:
            self.done = True
            self.conn.write(wire.encode_cancel(self.channel))
        self.conn.forget(self)


class ExecCall(Call):
    """A foreground exec: keeps at most ``limit`` bytes of each stream (the rest is counted, handed to the
    callbacks and dropped, and its credit returned at once: the process is drained, never blocked or killed)."""

    __slots__ = ("kept", "limit", "on_stderr", "on_stdout", "stderr", "stdout", "truncated")

    def __init__(
        self,
        conn: Connection,
        on_stdout: Callable[[bytes], object] | None,
        on_stderr: Callable[[bytes], object] | None,
        limit: int | None,
    ) -> None:
        super().__init__(conn)
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self.on_stdout, self.on_stderr, self.limit = on_stdout, on_stderr, limit
        self.kept, self.truncated = [0, 0, 0], [False, False, False]  # per stream

    def on_data(self, stream: int, data: bytes) -> None:
        if stream == wire.STDERR:
            chunks, callback = self.stderr, self.on_stderr
        else:
            stream, chunks, callback = wire.STDOUT, self.stdout, self.on_stdout
        keep = data
        if self.limit is not None and self.kept[stream] + len(data) > self.limit:
            keep = data[: self.limit - self.kept[stream]]
            self.truncated[stream] = True
        if keep:
            chunks.append(keep)
            self.kept[stream] += len(keep)
        self.ack(len(data))
        if callback is not None:
            try:
                callback(data)
            except Exception as exc:  # a failing callback fails this call, not the connection
                self.cancel()
                self.fail(exc)


_END = object()


class StreamCall(Call):
    """A call whose DATA is consumed by an async reader (process output, file download)."""

    __slots__ = ("items", "started", "waiter")

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.items: deque[tuple[int, bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.started: asyncio.Future[dict[str, Any]] = conn.loop.create_future()

    def on_data(self, stream: int, data: bytes) -> None:
        self.items.append((stream, data))
        self._notify()

    def on_event(self, event: Any) -> None:
        if isinstance(event, dict) and event.get("event") in ("started", "attached") and not self.started.done():
            self.started.set_result(event)

    def finish(self, result: Any) -> None:
        super().finish(result)
        self._settle_started()
        self._notify()

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self._settle_started()
        self._notify()

    def _settle_started(self) -> None:
        if not self.started.done():
            exc = self.future.exception() if self.future.done() else None
            self.started.set_exception(exc or AgentError("the call ended before the process started"))
            self.started.exception()  # mark retrieved: the caller may be gone

    def _notify(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_chunk(self) -> tuple[int, bytes] | None:
        """The next DATA (credit returned), or None after RESULT (raises the call's error)."""
        while not self.items:
            if self.future.done():
                self.future.result()  # raises the error, if any
                return None
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        stream, data = self.items.popleft()
        self.ack(len(data))
        return stream, data


class Connection(asyncio.Protocol):
    """The protocol object: frame parsing, the call table, write flow control."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parser = wire.FrameParser()
        self.calls: dict[int, Call] = {}
        self.channels = itertools.count(1)
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.closing = False
        self.broken: str | None = None  # why this client cut the connection (the agent broke the protocol)
        self.write_paused: asyncio.Future[None] | None = None
        self.nonce: str | None = None  # set when this client opens the session (character-device agents)

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport but have the same interface
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.broken is not None:
            err = AgentDisconnectedError(self.broken)
        elif self.closing:
            err = AgentDisconnectedError("the agent connection was closed by this client")
        else:
            err = AgentDisconnectedError(f"lost the connection to the agent ({exc or 'closed by the agent'})")
        if not self.hello.done():
            self.hello.set_exception(err)
            self.hello.exception()
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.fail(err)
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.write_paused = self.write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
            for kind, channel, payload in frames:
                call = self.calls.get(channel)
                if kind == wire.DATA:
                    if call is not None:
                        stream, chunk = wire.split_stream(payload)
                        call.received(len(chunk))
                        call.on_data(stream, chunk)
                elif kind == wire.RESULT:
                    if call is not None:
                        del self.calls[channel]
                        call.on_result(wire.decode_json(payload))
                elif kind == wire.EVENT:
                    if call is not None:
                        call.on_event(wire.decode_json(payload))
                elif kind == wire.WINDOW:
                    if call is not None:
                        call.on_window(wire.decode_window(payload))
                elif kind == wire.HELLO and not self.hello.done():
                    self.on_hello(wire.decode_json(payload))
        except wire.ProtocolError as exc:
            self.broken = f"agent protocol error: {exc}"
            if not self.hello.done():
                self.hello.set_exception(AgentError(self.broken))
            if self.transport is not None:
                self.transport.abort()

    def on_hello(self, hello: Any) -> None:
        if not isinstance(hello, dict):
            raise wire.ProtocolError("HELLO payload is not an object")
        if self.nonce is not None and hello.get("nonce") != self.nonce:
            return  # the answer to an earlier session's HELLO (a restored memory snapshot): not ours
        self.hello.set_result(hello)

    # -- helpers -------------------------------------------------------------------------------------
    def register(self, call: Call) -> int:
        if self.transport is None:
            raise AgentDisconnectedError("the agent connection is closed: reconnect with AgentClient.connect")
        channel = next(self.channels) & 0xFFFFFFFF
        self.calls[channel] = call
        return channel

    def forget(self, call: Call) -> None:
        if self.calls.get(call.channel) is call:
            del self.calls[call.channel]

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        waiter = self.write_paused
        if waiter is not None:
            await waiter


class ListCall(Call):
    __slots__ = ("entries",)

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.entries: list[dict[str, Any]] = []

    def on_event(self, event: Any) -> None:
        if isinstance(event, dict) and isinstance(event.get("entries"), list):
            self.entries.extend(event["entries"])
