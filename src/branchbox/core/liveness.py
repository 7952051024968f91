"""Agent liveness: notice an agent that can no longer answer while calls wait on it.

A killed agent is noticed at once (its connection ends, and the sandbox's pidfd fires). A *stopped* one (SIGSTOP
from the host, a debugger) keeps its connection open and answers nothing, so every call and stream on it would wait
until its own timeout, or forever. The kernel reports a stop only to the stopped process's parent (``waitid``), and
the daemon is not the parent of any sandbox's init, so there is no event to wait on: while at least one agent call
or stream is open, :class:`Watchdog` runs a check every ``interval`` seconds (reading ``/proc/PID/stat``, a few
microseconds per busy sandbox); when nothing waits on an agent it sleeps until the next call.

A sandbox cannot trigger this against itself: signals from inside its pid namespace cannot stop its init, and the
agent is not dumpable (no ptrace)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("branchbox.liveness")
INTERVAL_S = 1.0
STOPPED_STATES = frozenset("Tt")  # stopped by a signal, stopped by a tracer (a frozen cgroup shows "D" or "S")


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T, t, Z, ...), None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2 :]  # the command name may hold spaces and parentheses
    return rest[:1].decode() or None


def is_stopped(pid: int) -> bool:
    return process_state(pid) in STOPPED_STATES


class Watchdog:
    """Runs ``check`` every ``interval`` seconds from the first :meth:`kick` until ``check`` returns False (nothing
    waits on an agent any more); the next kick starts it again."""

    def __init__(self, check: Callable[[], bool], interval: float = INTERVAL_S) -> None:
        self._check = check
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="branchbox-liveness")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if not self._check():
                    return
            except Exception:  # a bug here must not end the checks for good
                log.exception("liveness check failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
