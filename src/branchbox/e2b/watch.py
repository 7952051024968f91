"""envd's directory watches (``WatchDir`` stream; ``CreateWatcher``/``GetWatcherEvents``/``RemoveWatcher`` polling)
on ``Manager.list_files``: the agent has no inotify, so a watch lists the directory every ``POLL_S`` and reports
the differences. Limits (docs/e2b.md): changes that come and go between two polls are not seen, a rename is a
REMOVE and a CREATE, and a WRITE is a change of size or modification time.
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

from branchbox.core.models import FileEntry
from branchbox.e2b.connect import RpcError, from_branchbox
from branchbox.e2b.state import E2BState, resolve_path
from branchbox.errors import BranchboxError

POLL_S = 0.2
MAX_WATCHERS = 16  # per sandbox
MAX_EVENTS = 10_000  # kept per polled watcher between two GetWatcherEvents (the oldest are dropped)
RECURSIVE_DEPTH = 32
Message = dict[str, Any]
Snapshot = dict[str, tuple[str, int, float, int]]


def _snapshot(root: str, entries: list[FileEntry]) -> Snapshot:
    return {posixpath.relpath(e.path, root): (e.type, e.size, e.mtime, e.mode) for e in entries}


def diff(old: Snapshot, new: Snapshot) -> list[Message]:
    """The events that turn ``old`` into ``new``, as envd's ``FilesystemEvent`` JSON."""
    out: list[Message] = []
    for name in sorted(new.keys() - old.keys()):
        out.append({"name": name, "type": "EVENT_TYPE_CREATE"})
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        if a[0] != b[0]:
            out += [{"name": name, "type": "EVENT_TYPE_REMOVE"}, {"name": name, "type": "EVENT_TYPE_CREATE"}]
        elif a[1:3] != b[1:3]:
            out.append({"name": name, "type": "EVENT_TYPE_WRITE"})
        elif a[3] != b[3]:
            out.append({"name": name, "type": "EVENT_TYPE_CHMOD"})
    for name in sorted(old.keys() - new.keys()):
        out.append({"name": name, "type": "EVENT_TYPE_REMOVE"})
    return out


@dataclass(slots=True)
class Watcher:
    sid: str
    path: str
    depth: int
    events: deque[Message] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    task: asyncio.Task[None] | None = None
    error: RpcError | None = None


class WatchService:
    def __init__(self, state: E2BState) -> None:
        self.state = state
        self.watchers: dict[str, Watcher] = state.watchers

    async def _list(self, w: Watcher) -> Snapshot:
        try:
            return _snapshot(w.path, await self.state.manager.list_files(w.sid, w.path, depth=w.depth))
        except BranchboxError as exc:
            raise from_branchbox(exc) from exc

    async def _open(self, sid: str, req: Message, user: str | None) -> tuple[Watcher, Snapshot]:
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise RpcError("invalid_argument", "path (a directory) is required")
        w = Watcher(sid, resolve_path(path, user), RECURSIVE_DEPTH if req.get("recursive") else 1)
        try:
            info = await self.state.manager.stat(sid, w.path)
        except BranchboxError as exc:
            raise from_branchbox(exc) from exc
        if info.type != "dir":
            raise RpcError("invalid_argument", f"{w.path} is not a directory")
        return w, await self._list(w)

    async def watch_dir(
        self, sid: str, req: Message, user: str | None, deadline: float | None
    ) -> AsyncIterator[Message]:
        w, snap = await self._open(sid, req, user)
        yield {"start": {}}
        last = time.monotonic()
        while deadline is None or time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            new = await self._list(w)
            for event in diff(snap, new):
                yield {"filesystem": event}
                last = time.monotonic()
            snap = new
            if time.monotonic() - last > 50:
                yield {"keepalive": {}}
                last = time.monotonic()
        raise RpcError("deadline_exceeded", "the watch's timeout passed")

    async def create(self, sid: str, req: Message, user: str | None) -> Message:
        if sum(w.sid == sid for w in self.watchers.values()) >= MAX_WATCHERS:
            raise RpcError("resource_exhausted", f"a sandbox has at most {MAX_WATCHERS} watchers: stop one first")
        w, snap = await self._open(sid, req, user)
        wid = secrets.token_hex(8)
        self.watchers[wid] = w
        w.task = asyncio.ensure_future(self._poll(w, snap))
        return {"watcherId": wid}

    async def _poll(self, w: Watcher, snap: Snapshot) -> None:
        try:
            while True:
                await asyncio.sleep(POLL_S)
                new = await self._list(w)
                w.events.extend(diff(snap, new))
                snap = new
        except RpcError as exc:  # the directory or the sandbox went away: the next GetWatcherEvents says so
            w.error = exc
            if exc.code == "unavailable":  # the sandbox is gone: nobody can ask any more
                for wid in [k for k, v in self.watchers.items() if v is w]:
                    del self.watchers[wid]

    def _get(self, sid: str, req: Message) -> tuple[str, Watcher]:
        wid = req.get("watcherId", req.get("watcher_id"))
        w = self.watchers.get(wid) if isinstance(wid, str) else None
        if w is None or w.sid != sid:
            raise RpcError("not_found", f"no watcher {wid!r} in this sandbox")
        return wid, w  # type: ignore[return-value]

    async def events(self, sid: str, req: Message) -> Message:
        _, w = self._get(sid, req)
        out = list(w.events)
        w.events.clear()
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
