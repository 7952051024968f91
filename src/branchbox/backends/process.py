"""Helpers on host processes shared by the backends."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


async def wait_pid_exit(pid: int, still_ours: Callable[[], bool]) -> None:
    """Return when process ``pid`` has exited (a pidfd becomes readable: no polling).

    ``still_ours`` is checked after the pidfd is open, so that a pid reused by another process is not waited on."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not still_ours():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await fut
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
