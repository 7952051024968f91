"""Disk limits of sandboxes and the daemon's reserve (docs/snapshots.md "Disk limits").

* ``disk_mb`` of a create: what a sandbox's writable layer may hold, enforced by the storage driver (btrfs
  qgroups: ``storage/quota.py``). A driver or backend that cannot limit refuses an explicit ``disk_mb`` and gives
  its sandboxes ``disk_mb = 0`` (no limit), so the info never claims a limit that is not there.
* The reserve: the daemon's own state (SQLite, logs, layers being made) needs room. The daemon's sandboxes
  together may hold only what leaves ``reserve_mb`` free (their writes then fail with EDQUOT, as past their own
  limit); when less than the reserve (plus room for one small sandbox) is free, anything that writes to the data
  dir (create, fork, restore, snapshot) is refused with ``disk_full`` before it starts; ``/health`` says
  ``degraded`` with the reason, ``/metrics`` has the figures.

Functions over ``statvfs`` and the driver's figures, and the ``ReserveKeeper`` that refreshes the sandboxes'
group limit (btrfs: a level-1 qgroup of every upper of the daemon, limited to what they hold + free - reserve)
in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from branchbox.errors import BadRequestError, DiskFullError, LimitExceededError, NotSupportedError
from branchbox.limits import MAX_DISK_MB, MIN_DISK_MB
from branchbox.storage.base import NO_DISK_LIMITS

log = logging.getLogger("branchbox.disk")


def resolve(
    requested: int | None, *, default: int, enforcer: str | None, vm: bool, inherited: int | None = None
) -> int:
    """The ``disk_mb`` a new sandbox gets: ``requested`` (checked), else ``inherited`` (a restore: the limit of
    the sandbox its snapshot was taken from, when it had one), else ``default``; 0 where nothing enforces it.

    ``enforcer``: the storage driver's ``disk_limits`` (None: it cannot limit); ``vm``: the backend keeps the
    sandbox's files in a disk image of its own (a microVM), not in the driver's upper."""
    if requested is not None:
        if (
            isinstance(requested, bool)
            or not isinstance(requested, int)
            or not (MIN_DISK_MB <= requested <= MAX_DISK_MB)
        ):
            raise BadRequestError(f"disk_mb is {requested!r}: pass an integer between {MIN_DISK_MB} and {MAX_DISK_MB}")
        if vm:
            raise NotSupportedError(
                "disk_mb is not supported by the microvm backend (its disk is the template's image size); "
                "leave it out or use the container backend"
            )
        if enforcer is None:
            raise NotSupportedError(NO_DISK_LIMITS)
        return requested
    if enforcer is None or vm:
        return 0
    return inherited or default


@dataclass(frozen=True, slots=True)
class Pressure:
    """The data dir's filesystem now: sizes in bytes."""

    free: int  # what an unprivileged writer may still use (statvfs f_bavail)
    size: int
    reserve: int  # kept for the daemon's own state (0: none)
    sandboxes: int | None = None  # bytes the daemon's sandboxes' uppers hold together (None: not measured here)
    sandboxes_limit: int | None = None  # what they may hold together: the reserve's qgroup limit (None: none)

    @property
    def low(self) -> bool:
        """With a reserve: less free than the reserve and room for one small sandbox (MIN_DISK_MB): a new
        sandbox could write next to nothing, and the daemon's own writes come next."""
        return self.reserve > 0 and self.free < self.reserve + (MIN_DISK_MB << 20)

    def reason(self) -> str:
        return (
            f"the data dir's filesystem has {self.free >> 20} MiB free and the daemon keeps {self.reserve >> 20} "
            "MiB (reserve_mb) for its own state"
        )


def pressure(data_dir: Path, reserve_mb: int, sandboxes: tuple[int, int] | None = None) -> Pressure:
    """``sandboxes``: (bytes, limit) of the daemon's sandboxes together, where the driver measures it."""
    st = os.statvfs(data_dir)
    used, limit = sandboxes if sandboxes is not None else (None, None)
    return Pressure(
        free=st.f_bavail * st.f_frsize,
        size=st.f_blocks * st.f_frsize,
        reserve=max(0, reserve_mb) << 20,
        sandboxes=used,
        sandboxes_limit=limit,
    )


def check_reserve(data_dir: Path, reserve_mb: int, what: str) -> None:
    """Refuse ``what`` (a create, a snapshot...) with ``disk_full`` when the reserve is (nearly) reached."""
    if reserve_mb <= 0:
        return
    p = pressure(data_dir, reserve_mb)
    if p.low:
        raise DiskFullError(
            f"{what} refused: {p.reason()}; destroy sandboxes or delete snapshots to free space, or lower reserve_mb"
        )


class ReserveKeeper:
    """Keeps the reserve out of the sandboxes' reach: ``keep`` (the driver's ``keep_free``: new uppers join the
    sandboxes' group, whose limit = what they hold + free - reserve) runs in a thread after creates, forks and
    scrapes, never on the caller's path: one at a time, at most once per ``interval`` seconds, and at most
    ``interval`` seconds after a poke."""

    def __init__(self, keep: Callable[[int], tuple[int, int] | None], reserve_mb: int, interval: float = 1.0) -> None:
        self._keep = keep
        self._reserve = max(0, reserve_mb) << 20
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._again = False
        self._last = -interval
        self.state: tuple[int, int] | None = None  # (bytes, limit) of the sandboxes at the last refresh

    def refresh_now(self) -> None:
        """Synchronously (the Manager's start)."""
        self.state = self._keep(self._reserve)
        self._last = time.monotonic()

    def poke(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop's thread: the next poke from there refreshes
            return
        if self._task is not None and not self._task.done():
            self._again = True  # once this one ends
            return
        if self._timer is not None:
            return
        wait = self._last + self._interval - time.monotonic()
        if wait > 0:
            self._timer = loop.call_later(wait, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        self._last = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            self.state = await asyncio.to_thread(self._keep, self._reserve)
        except OSError as exc:
            log.warning("keeping the disk reserve failed: %s", exc)
        if self._again:
            self._again = False
            self.poke()

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def check_snapshot_budget(used_bytes: int, budget_mb: int) -> None:
    """Refuse a snapshot (``limit_exceeded``) once the snapshots' layers hold ``budget_mb`` or more (0: no budget).

    Layers are measured in the background after each snapshot, so a burst of snapshots may pass the budget by
    the layers not measured yet; the next one after the measurement is refused."""
    if budget_mb > 0 and used_bytes >= budget_mb << 20:
        raise LimitExceededError(
            f"the snapshots of this daemon hold {used_bytes >> 20} MiB, its snapshot_budget_mb is {budget_mb}: "
            "delete snapshots you no longer need (or raise snapshot_budget_mb)"
        )
