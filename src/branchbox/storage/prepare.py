"""Copy-on-write storage for a data dir: a btrfs filesystem in a sparse file, mounted at the data dir.

Snapshots and forks are O(1) on btrfs (subvolume snapshots) but a full copy of the sandbox's upper layer with the
``overlay`` driver on ext4. Most hosts have ext4, so set-up (``branchbox storage prepare``, which ``make run`` and
``make test`` call) gives a *fresh* data dir a btrfs filesystem of its own, the way LXD's default storage pool does:

- the image is ``<data dir>.btrfs`` next to the data dir, sparse, ``size_gb`` large (default: half the space left on
  the host filesystem, between 8 GiB and 1 TiB), and mounted with ``-o loop`` (autoclear: unmounting frees the loop
  device);
- after a reboot the same command mounts the existing image again (idempotent);
- a data dir that already holds data on another filesystem is left alone (nothing is moved: the overlay driver
  works there, only slower to snapshot), and so is one already on btrfs.

This runs once at set-up, never on a request path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from branchbox.errors import BackendError, NotSupportedError
from branchbox.storage.fsutil import BTRFS_SUPER_MAGIC, fs_type

MIN_SIZE_GB = 8
MAX_SIZE_GB = 1024
IGNORED_ENTRIES = frozenset({"lost+found"})


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``prepare`` did: ``action`` is one of created, mounted, already-btrfs, kept-existing-data."""

    data_dir: Path
    action: str
    image: Path | None = None
    message: str = ""


def image_path(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".btrfs")


def default_size_gb(data_dir: Path) -> int:
    st = os.statvfs(data_dir.parent)
    free_gb = st.f_bavail * st.f_frsize // (1 << 30)
    return max(MIN_SIZE_GB, min(MAX_SIZE_GB, free_gb // 2))


def _has_data(data_dir: Path) -> bool:
    if not data_dir.is_dir():
        return False
    with os.scandir(data_dir) as entries:
        return any(e.name not in IGNORED_ENTRIES for e in entries)


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendError(f"{what} failed ({' '.join(argv)}): {done.stderr.strip() or done.stdout.strip()}")


def prepare(data_dir: Path, *, size_gb: int | None = None) -> Prepared:
    """Give ``data_dir`` a btrfs filesystem when it is fresh (see the module docstring). Idempotent."""
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    image = image_path(data_dir)
    if fs_type(data_dir) == BTRFS_SUPER_MAGIC:
        return Prepared(data_dir, "already-btrfs", image if image.exists() else None, f"{data_dir} is on btrfs")
    if image.exists():
        if _has_data(data_dir):
            raise BackendError(
                f"{image} exists but is not mounted, and {data_dir} holds files: move them away (or delete the "
                f"image) and run `branchbox storage prepare` again"
            )
        _mount(image, data_dir)
        return Prepared(data_dir, "mounted", image, f"mounted {image} on {data_dir}")
    if _has_data(data_dir):
        return Prepared(
            data_dir,
            "kept-existing-data",
            None,
            f"{data_dir} already holds data on a filesystem without snapshots: kept as it is (the overlay driver "
            f"copies a sandbox's files on snapshot and fork). For O(1) snapshots stop the daemon, move {data_dir} "
            f"away and run `branchbox storage prepare` again",
        )
    for tool in ("mkfs.btrfs", "mount"):
        if shutil.which(tool) is None:
            raise NotSupportedError(f"{tool} is not installed: apt-get install btrfs-progs mount")
    size = size_gb if size_gb is not None else default_size_gb(data_dir)
    if size < 1:
        raise NotSupportedError(f"size_gb is {size}: pass at least 1")
    tmp = image.with_name(image.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size << 30)
        _run(["mkfs.btrfs", "-q", "-f", str(tmp)], "mkfs.btrfs")
        os.rename(tmp, image)
    finally:
        tmp.unlink(missing_ok=True)
    _mount(image, data_dir)
    return Prepared(data_dir, "created", image, f"created a {size} GiB btrfs filesystem in {image} on {data_dir}")


def _mount(image: Path, data_dir: Path) -> None:
    _run(["mount", "-o", "loop,noatime", str(image), str(data_dir)], "mount")
    os.chmod(data_dir, 0o711)  # noqa: S103 - the sandbox uid range must traverse it; nothing is listable
