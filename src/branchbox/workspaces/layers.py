"""Commit layers on each storage driver: where the tree is written, and how it becomes an immutable layer.

* ``overlay``: the layer *is* the tree: written in ``DATA/layers/<id>.tmp``, renamed to ``DATA/layers/<id>``.
* ``btrfs``: a layer is a read-only subvolume whose ``upper`` is the tree: written into a writable subvolume
  ``<id>.tmp/upper``, then snapshotted read-only as ``<id>`` (O(1)) and the writable one deleted.

A crash in between leaves ``<id>.tmp``, which the Manager removes at its next start (an unknown layer dir).
"""

from __future__ import annotations

import os
from pathlib import Path

from branchbox.storage import btrfs
from branchbox.storage.fsutil import fsync_dir
from branchbox.storage.overlay import remove_sandbox_dirs


def staging_dir(driver: str, dest: Path) -> tuple[Path, Path]:
    """Create the staging area for layer ``dest``; return ``(staging, tree)`` (write the lower's files in tree)."""
    tmp = dest.with_name(dest.name + ".tmp")
    if driver == "btrfs":
        btrfs.create_subvolume(tmp)
        tree = tmp / "upper"
        tree.mkdir(mode=0o755)
        return tmp, tree
    tmp.mkdir(mode=0o755)
    return tmp, tmp


def seal(driver: str, staging: Path, dest: Path) -> None:
    if driver == "btrfs":
        btrfs.snapshot(staging, dest, readonly=True)
        btrfs.delete_subvolume(staging)
    else:
        os.rename(staging, dest)
    fsync_dir(dest.parent)


def discard(driver: str, staging: Path) -> None:
    if driver == "btrfs" and btrfs.is_subvolume(staging):
        btrfs.delete_subvolume(staging)
    else:
        remove_sandbox_dirs(staging)
