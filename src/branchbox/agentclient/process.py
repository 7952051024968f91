"""A process streamed through the agent (:meth:`AgentClient.spawn`, :meth:`AgentClient.attach`): its output
chunks and exit, stdin, resize, kill, detach. :mod:`branchbox.agentclient.client` re-exports it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from branchbox.agent import wire
from branchbox.agentclient.calls import StreamCall
from branchbox.errors import AgentDisconnectedError, InvalidStateError

Request = Callable[[str, Mapping[str, Any]], Awaitable[Any]]  # AgentClient._request: one call, its result


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True, slots=True)
class ProcessExit:
    exit_code: int
    signal: int | None


_STREAMS: dict[int, Literal["stdout", "stderr"]] = {wire.STDOUT: "stdout", wire.STDERR: "stderr"}


class ProcessHandle:
    """A background process: iterate for OutputChunk items and a final ProcessExit."""

    def __init__(self, request: Request, call: StreamCall, pid: int) -> None:
        self.pid = pid
        self._request = request
        self._call = call
        self._exit: ProcessExit | None = None
        self._ended = False

    def __aiter__(self) -> ProcessHandle:
        return self

    async def __anext__(self) -> OutputChunk | ProcessExit:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._call.next_chunk()
        except BaseException:
            self._ended = True
            raise
        if item is not None:
            return OutputChunk(_STREAMS.get(item[0], "stdout"), item[1])
        self._ended = True
        result = self._call.future.result()
        if isinstance(result, dict) and "exit_code" in result:
            self._exit = ProcessExit(int(result["exit_code"]), result.get("signal"))
            return self._exit
        raise StopAsyncIteration  # detached

    @property
    def exit(self) -> ProcessExit | None:
        """The exit status once iteration reached it."""
        return self._exit

    async def wait(self) -> ProcessExit:
        """Drain output until the process exits."""
        async for item in self:
            if isinstance(item, ProcessExit):
                return item
        if self._exit is not None:
            return self._exit
        raise InvalidStateError(f"process {self.pid} was detached: attach again to wait for it")

    async def send_stdin(self, data: bytes) -> None:
        if self._call.done:
            raise InvalidStateError(f"process {self.pid} is no longer attached: attach again to send input")
        await self._call.send_stream(wire.STDIN, data)

    async def close_stdin(self) -> None:
        """EOF on stdin (a pty process receives ^D instead)."""
        if not self._call.done:
            self._call.conn.write(wire.encode_eof(self._call.channel, wire.STDIN))

    async def resize(self, cols: int, rows: int) -> None:
        await self._request("pty.resize", {"pid": self.pid, "cols": cols, "rows": rows})

    async def kill(self, signal: int = 9) -> None:
        await self._request("processes.kill", {"pid": self.pid, "signal": signal})

    async def detach(self) -> None:
        """Stop streaming; the process keeps running."""
        call = self._call
        if not call.done:
            call.conn.write(wire.encode_cancel(call.channel))
            with contextlib.suppress(AgentDisconnectedError):
                await asyncio.shield(call.future)
        call.items.clear()
        self._ended = True
