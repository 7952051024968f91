"""A directory watch on the agent (``files.watch``): the JSON lines it streams, as :class:`FileEvent`s."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

from branchbox.agentclient.calls import StreamCall
from branchbox.errors import AgentError
from branchbox.models import FileEvent

EVENT_TYPES = frozenset({"create", "write", "remove", "rename", "chmod", "overflow"})
MAX_LINE = 64 * 1024  # a path is at most 4 KiB: a longer line is an agent that breaks the protocol


def parse_event(line: bytes) -> FileEvent:
    """One line of the agent's watch stream (untrusted: a sandbox's PID 1 wrote it)."""
    try:
        obj: Any = json.loads(line)
    except ValueError as exc:
        raise AgentError(f"malformed watch event from the agent: {line[:200]!r}") from exc
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind not in EVENT_TYPES:
        raise AgentError(f"malformed watch event from the agent: {line[:200]!r}")
    if kind == "overflow":
        return FileEvent("overflow", "", reason=str(obj.get("reason") or "queue"))
    name = obj.get("name")
    if not isinstance(name, str):
        raise AgentError(f"malformed watch event from the agent: {line[:200]!r}")
    return FileEvent(kind, name, is_dir=obj.get("dir") is True)


class DirWatch:
    """An open watch: ``async for event in watch`` until the watched directory is removed (the iteration ends;
    :attr:`ended` says why) or :meth:`aclose` (which removes the watches in the sandbox). Only what the consumer
    has not read yet is buffered, within the call's flow-control window."""

    def __init__(self, call: StreamCall, path: str) -> None:
        self._call = call
        self.path = path
        self._events: deque[FileEvent] = deque()
        self._rest = b""
        self._next: asyncio.Future[FileEvent] | None = None

    def __aiter__(self) -> DirWatch:
        return self

    async def __anext__(self) -> FileEvent:
        """The next event (cancelling the wait loses nothing); raises the call's error, if it failed."""
        while not self._events:
            item = await self._call.next_chunk()
            if item is None:
                raise StopAsyncIteration
            self._feed(item[1])
        return self._events.popleft()

    async def next(self, timeout: float) -> FileEvent | None:
        """The next event, or None when none came within ``timeout`` seconds (the wait goes on at the next call:
        nothing is lost); raises StopAsyncIteration at the end, or the call's error."""
        if self._next is None:
            self._next = asyncio.ensure_future(self.__anext__())
        done, _ = await asyncio.wait({self._next}, timeout=max(0.0, timeout))
        if not done:
            return None
        fut, self._next = self._next, None
        return fut.result()

    def _feed(self, data: bytes) -> None:
        *lines, rest = (self._rest + data).split(b"\n")
        if len(rest) > MAX_LINE:
            self._call.cancel()
            raise AgentError("the agent sent a watch event line over 64 KiB")
        self._rest = rest
        self._events.extend(parse_event(line) for line in lines if line)

    @property
    def ended(self) -> str | None:
        """Why the watch ended (``removed``: the directory is gone, ``cancelled``), None while it runs."""
        fut = self._call.future
        if not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        result = fut.result()
        return str(result.get("ended")) if isinstance(result, dict) else None

    async def aclose(self) -> None:
        """Stop watching (the agent closes its inotify descriptor: every watch of this call goes)."""
        if self._next is not None:
            self._next.cancel()
            self._next = None
        if not self._call.future.done():
            self._call.cancel()
