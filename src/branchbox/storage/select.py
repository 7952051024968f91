"""Pick the storage driver for a data dir: ``btrfs`` when it lives on btrfs, else ``overlay``."""

from __future__ import annotations

import logging
from pathlib import Path

from branchbox.errors import NotSupportedError
from branchbox.storage import quota
from branchbox.storage.base import StorageDriver
from branchbox.storage.btrfs import BtrfsDriver
from branchbox.storage.fsutil import BTRFS_SUPER_MAGIC, fs_type
from branchbox.storage.overlay import OverlayDriver

DRIVERS = ("overlay", "btrfs")
log = logging.getLogger("branchbox.storage")


def make_driver(kind: str, data_dir: Path) -> StorageDriver:
    """``auto`` | ``overlay`` | ``btrfs``. ``btrfs`` needs the data dir on a btrfs filesystem, and turns its
    quotas on (simple quotas: storage/quota.py) so sandboxes' disks can be limited."""
    on_btrfs = fs_type(data_dir) == BTRFS_SUPER_MAGIC
    if kind == "auto":
        kind = "btrfs" if on_btrfs else "overlay"
    if kind == "overlay":
        return OverlayDriver()
    if kind == "btrfs":
        if not on_btrfs:
            raise NotSupportedError(f"storage driver btrfs needs {data_dir} on btrfs; use overlay")
        try:
            mode = quota.enable(data_dir)  # once per filesystem; a neighbour's subvolumes get no limit from it
        except OSError as exc:
            log.warning("disk limits are off: btrfs quotas on %s: %s; sandboxes get no disk_mb", data_dir, exc)
            mode = None
        return BtrfsDriver(mode, data_dir)
    raise NotSupportedError(f"storage driver {kind!r} does not exist; use one of: auto, {', '.join(DRIVERS)}")
