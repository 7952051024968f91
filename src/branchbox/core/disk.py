"""Disk limits of sandboxes and the daemon's reserve (docs/snapshots.md "Disk limits").

* ``disk_mb`` of a create: what a sandbox's writable layer may hold, enforced by the storage driver (btrfs
  qgroups: ``storage/quota.py``). A driver or backend that cannot limit refuses an explicit ``disk_mb`` and gives
  its sandboxes ``disk_mb = 0`` (no limit), so the info never claims a limit that is not there.
* The reserve: the daemon's own state (SQLite, logs, layers being made) needs room. When the data dir's
  filesystem has less than ``reserve_mb`` free, anything that writes to it (create, fork, restore, snapshot) is
  refused with ``disk_full`` before it starts; ``/health`` says ``degraded`` with the reason, ``/metrics`` has the
  figures.

Pure functions but ``statvfs``; no state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from branchbox.core.limits import MAX_DISK_MB, MIN_DISK_MB
from branchbox.errors import BadRequestError, DiskFullError, LimitExceededError, NotSupportedError


def resolve(requested: int | None, *, default: int, enforcer: str | None, vm: bool) -> int:
    """The ``disk_mb`` a new sandbox gets: ``requested`` (checked), else ``default``; 0 where nothing enforces it.

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
            raise NotSupportedError(
                "disk_mb needs a data dir on btrfs (the overlay storage driver cannot limit a sandbox's disk): "
                "leave it out, or move the data dir to btrfs (`branchbox storage prepare` on a fresh data dir)"
            )
        return requested
    return default if enforcer is not None and not vm else 0


@dataclass(frozen=True, slots=True)
class Pressure:
    """The data dir's filesystem now: sizes in bytes."""

    free: int  # what an unprivileged writer may still use (statvfs f_bavail)
    size: int
    reserve: int

    @property
    def low(self) -> bool:
        """Less free than the reserve: writes of the daemon's own may soon fail."""
        return self.free < self.reserve

    def reason(self) -> str:
        return (
            f"the data dir's filesystem has {self.free >> 20} MiB free, below the daemon's reserve of "
            f"{self.reserve >> 20} MiB"
        )


def pressure(data_dir: Path, reserve_mb: int) -> Pressure:
    st = os.statvfs(data_dir)
    return Pressure(free=st.f_bavail * st.f_frsize, size=st.f_blocks * st.f_frsize, reserve=reserve_mb << 20)


def check_reserve(data_dir: Path, reserve_mb: int, what: str) -> None:
    """Refuse ``what`` (a create, a snapshot...) with ``disk_full`` when free space is below the reserve."""
    if reserve_mb <= 0:
        return
    p = pressure(data_dir, reserve_mb)
    if p.low:
        raise DiskFullError(
            f"{what} refused: {p.reason()}; destroy sandboxes or delete snapshots to free space, or lower reserve_mb"
        )


def check_snapshot_budget(used_bytes: int, budget_mb: int) -> None:
    """Refuse a snapshot (``limit_exceeded``) once the snapshots' layers hold ``budget_mb`` or more (0: no budget).

    Layers are measured in the background after each snapshot, so a burst of snapshots may pass the budget by
    the layers not measured yet; the next one after the measurement is refused."""
    if budget_mb > 0 and used_bytes >= budget_mb << 20:
        raise LimitExceededError(
            f"the snapshots of this daemon hold {used_bytes >> 20} MiB, its snapshot_budget_mb is {budget_mb}: "
            "delete snapshots you no longer need (or raise snapshot_budget_mb)"
        )
