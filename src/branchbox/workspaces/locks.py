"""Per-repository locks (an asyncio lock in the daemon plus an ``flock`` so two daemons sharing a data dir never
fetch into one mirror at once) and single-flight calls (concurrent callers of one key share one result)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


class RepoLocks:
    def __init__(self, lock_dir: Path) -> None:
        self._dir = lock_dir
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            fd = os.open(self._dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another daemon holds it: wait in a thread (rare)
                    await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the flock


class SingleFlight:
    """``await sf.do(key, fn)``: while a call for ``key`` runs, other callers of ``key`` await the same result.

    The call runs in a task of its own: a caller that is cancelled does not cancel it for the others."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[Any]] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[_T]]) -> _T:
        task = self._running.get(key)
        if task is None:

            async def run() -> _T:
                return await fn()

            task = asyncio.get_running_loop().create_task(run())
            self._running[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        result: _T = await asyncio.shield(task)
        return result

    def _forget(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every caller went away
