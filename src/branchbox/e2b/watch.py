"""envd's directory watches (the ``WatchDir`` stream; ``CreateWatcher``/``GetWatcherEvents``/``RemoveWatcher``)
on ``Manager.watch_dir``: the sandbox's agent watches with inotify and streams the events as they happen (no
polling). Events are envd's: a name relative to the watched directory and one of CREATE, WRITE, REMOVE, RENAME
(the old name; the new one is a CREATE), CHMOD.

Bounded: at most :data:`MAX_WATCHERS` watchers per sandbox (streams and polled ones), a polled watcher keeps at
most :data:`MAX_EVENTS` events between two ``GetWatcherEvents`` (then it stops reading, the agent and the
kernel's queue hold the rest, and when that overflows the watcher fails as envd's does on ``IN_Q_OVERFLOW``).
A stream ends cleanly when the watched directory is removed; a polled watcher then answers its last events and
``not_found``.

``include_entry`` (envd 0.6.3): each event carries the ``EntryInfo`` of its entry, a ``Manager.stat`` of the path
when the event is handled (so it describes the entry as it is then); none for REMOVE and RENAME (the name is gone)
nor when the entry is gone by then, as envd sends it "when available".
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from branchbox.agentclient.watch import DirWatch
from branchbox.e2b.connect import RpcError, from_branchbox
from branchbox.e2b.filesystem import entry_json
from branchbox.e2b.state import XATTR_PREFIX, E2BState, resolve_path
from branchbox.errors import AgentDisconnectedError, BranchboxError, SandboxNotFoundError
from branchbox.models import FileEvent

MAX_WATCHERS = 16  # per sandbox, streams and polled watchers together
MAX_EVENTS = 10_000  # kept per polled watcher between two GetWatcherEvents
KEEPALIVE_DEFAULT_S = 50.0
Message = dict[str, Any]
_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}
OVERFLOW = (
    "watcher error: the event queue overflowed and events were lost (the watcher was not read fast enough, or "
    "the tree has more directories than a sandbox may watch): read events sooner, or watch a smaller tree"
)


def event_json(e: FileEvent) -> Message:
    """envd's ``FilesystemEvent`` of an agent event (an overflow has none: the watch fails)."""
    if e.type == "overflow":
        raise RpcError("internal", OVERFLOW)
    return {"name": e.name, "type": _TYPES.get(e.type, "EVENT_TYPE_UNSPECIFIED")}


def _gone(sid: str) -> RpcError:
    return RpcError("unavailable", f"The sandbox {sid} was not found: it was killed or paused while watched")


@dataclass(frozen=True, slots=True)
class Opened:
    """A watch as the request asked for it: the agent's watch of ``path``, and whether events carry entries."""

    sid: str
    path: str
    handle: DirWatch
    include_entry: bool


async def describe(state: E2BState, w: Opened, e: FileEvent) -> Message:
    """The event as envd sends it, with its entry when the watch asked for entries and the entry is there."""
    out = event_json(e)
    if not w.include_entry or e.type in ("remove", "rename"):
        return out
    try:
        entry = await state.manager.stat(w.sid, posixpath.join(w.path, e.name), xattrs=XATTR_PREFIX)
    except BranchboxError:  # gone since (or the sandbox is): no entry, as envd's "when available"
        return out
    return {**out, "entry": entry_json(entry)}


@dataclass(slots=True)
class Watcher:
    sid: str
    path: str
    handle: DirWatch
    opened: Opened
    events: deque[Message] = field(default_factory=deque)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    error: RpcError | None = None


class WatchService:
    def __init__(self, state: E2BState) -> None:
        self.state = state
        self.watchers: dict[str, Watcher] = state.watchers
        self.streams = state.watch_streams

    def _count(self, sid: str) -> int:
        return sum(w.sid == sid for w in self.watchers.values()) + self.streams.get(sid, 0)

    async def _open(self, sid: str, req: Message, user: str | None) -> Opened:
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise RpcError("invalid_argument", "path (a directory) is required")
        if self._count(sid) >= MAX_WATCHERS:
            raise RpcError("resource_exhausted", f"a sandbox has at most {MAX_WATCHERS} watchers: stop one first")
        full = resolve_path(path, user)
        include = req.get("includeEntry", req.get("include_entry", False))
        if not isinstance(include, bool):
            raise RpcError("invalid_argument", "includeEntry must be true or false")
        try:
            handle = await self.state.manager.watch_dir(sid, full, recursive=bool(req.get("recursive")))
        except BranchboxError as exc:
            raise from_branchbox(exc) from exc
        return Opened(sid, full, handle, include)

    # -- the stream ----------------------------------------------------------------------------------
    async def watch_dir(
        self, sid: str, req: Message, user: str | None, deadline: float | None, keepalive: float | None = None
    ) -> AsyncIterator[Message]:
        opened = await self._open(sid, req, user)
        handle = opened.handle
        self.streams[sid] = self.streams.get(sid, 0) + 1
        try:
            yield {"start": {}}
            interval = keepalive or KEEPALIVE_DEFAULT_S
            while True:
                wait = interval if deadline is None else min(interval, deadline - time.monotonic())
                try:
                    event = await handle.next(wait)
                except StopAsyncIteration:
                    return  # the watched directory was removed: the stream ends cleanly
                except (AgentDisconnectedError, SandboxNotFoundError) as exc:
                    raise _gone(sid) from exc
                except BranchboxError as exc:
                    raise from_branchbox(exc) from exc
                if event is not None:
                    yield {"filesystem": await describe(self.state, opened, event)}
                elif deadline is not None and time.monotonic() >= deadline:
                    raise RpcError("deadline_exceeded", "the watch's timeout passed")
                else:
                    yield {"keepalive": {}}
        finally:
            left = self.streams.get(sid, 1) - 1
            if left > 0:
                self.streams[sid] = left
            else:
                self.streams.pop(sid, None)
            with contextlib.suppress(BranchboxError, asyncio.CancelledError):
                await handle.aclose()

    # -- polled watchers -----------------------------------------------------------------------------
    async def create(self, sid: str, req: Message, user: str | None) -> Message:
        opened = await self._open(sid, req, user)
        wid = "w" + secrets.token_hex(8)
        w = self.watchers[wid] = Watcher(sid, opened.path, opened.handle, opened)
        w.task = asyncio.ensure_future(self._pump(wid, w))
        return {"watcherId": wid}

    async def _pump(self, wid: str, w: Watcher) -> None:
        """Keep the watcher's events until GetWatcherEvents takes them; a full queue stops reading (the agent
        holds the rest, then the kernel's queue, whose overflow fails the watcher)."""
        try:
            async for event in w.handle:
                while len(w.events) >= MAX_EVENTS:
                    w.room.clear()
                    await w.room.wait()
                w.events.append(await describe(self.state, w.opened, event))
            w.error = RpcError("not_found", f"the watched directory {w.path} was removed")
        except RpcError as exc:
            w.error = exc
        except (AgentDisconnectedError, SandboxNotFoundError):
            w.error = _gone(w.sid)
            if self.watchers.get(wid) is w:  # the sandbox is gone: nobody can ask any more
                del self.watchers[wid]
        except BranchboxError as exc:
            w.error = from_branchbox(exc)
        finally:
            with contextlib.suppress(BranchboxError, asyncio.CancelledError):
                await w.handle.aclose()

    def _get(self, sid: str, req: Message) -> tuple[str, Watcher]:
        wid = req.get("watcherId", req.get("watcher_id"))
        w = self.watchers.get(wid) if isinstance(wid, str) else None
        if w is None or w.sid != sid:
            raise RpcError("not_found", f"watcher with id {wid!r} not found in this sandbox")
        return wid, w  # type: ignore[return-value]

    async def events(self, sid: str, req: Message) -> Message:
        _, w = self._get(sid, req)
        out = list(w.events)
        w.events.clear()
        w.room.set()
        if not out and w.error is not None:
            raise w.error
        return {"events": out}

    async def remove(self, sid: str, req: Message) -> Message:
        wid, w = self._get(sid, req)
        del self.watchers[wid]
        if w.task is not None:
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w.task
        return {}
