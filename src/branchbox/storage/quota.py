"""btrfs qgroups: per-subvolume disk limits (a sandbox's writable layer) by ioctl, no subprocess.

The data dir's filesystem gets *simple quotas* (``squota``, Linux 6.7+): an extent is charged once, to the
subvolume that wrote it, at allocation, so accounting costs nothing at snapshot time (full qgroups walk shared
extents on every commit and made snapshots of busy trees slower). A clone of a layer (a restore's upper) is charged
only for what it writes afterwards. A filesystem that already has full qgroups keeps them: limits then apply to the
subvolume's exclusive bytes, which is the same figure for what a sandbox writes.

Limits are ``max_excl`` of the subvolume's level-0 qgroup: a write past it fails with ``EDQUOT`` ("Disk quota
exceeded") inside the sandbox, and nothing else on the filesystem is affected. Quotas are per filesystem: enabling
them on a filesystem several daemons share changes nothing for the others (their subvolumes get qgroups without a
limit). Deleting a subvolume drops its qgroup once its extents are freed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import uuid
from pathlib import Path

_TYPE = 0x94


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_TYPE << 8) | nr


_W, _R = 1, 2
BTRFS_IOC_INO_LOOKUP = _ioc(_R | _W, 18, 4096)
BTRFS_IOC_FS_INFO = _ioc(_R, 31, 1024)
BTRFS_IOC_QUOTA_CTL = _ioc(_R | _W, 40, 16)
BTRFS_IOC_QGROUP_LIMIT = _ioc(_R, 43, 48)  # _IOR in the kernel's header, although it only reads the argument
QUOTA_CTL_ENABLE_SIMPLE = 4
QGROUP_LIMIT_MAX_EXCL = 1 << 1
BTRFS_FIRST_FREE_OBJECTID = 256
SYSFS = Path("/sys/fs/btrfs")


class QuotaUnavailableError(OSError):
    """This filesystem or kernel cannot limit a subvolume's disk use."""


def _ioctl(path: Path, request: int, arg: bytearray) -> bytearray:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, arg)
    finally:
        os.close(fd)
    return arg


def fsid(path: Path) -> str:
    """The btrfs filesystem's UUID (its directory under /sys/fs/btrfs)."""
    buf = _ioctl(path, BTRFS_IOC_FS_INFO, bytearray(1024))
    return str(uuid.UUID(bytes=bytes(buf[16:32])))


def subvolume_id(path: Path) -> int:
    """The id of the subvolume holding directory ``path`` (its level-0 qgroup is ``0/<id>``)."""
    buf = bytearray(4096)
    struct.pack_into("QQ", buf, 0, 0, BTRFS_FIRST_FREE_OBJECTID)
    return int(struct.unpack_from("Q", _ioctl(path, BTRFS_IOC_INO_LOOKUP, buf), 0)[0])


def mode(path: Path) -> str | None:
    """``squota`` | ``qgroup`` (full accounting) | None (quotas off) for the filesystem holding ``path``."""
    d = SYSFS / fsid(path) / "qgroups"
    if not d.is_dir():
        return None
    try:
        return (d / "mode").read_text().strip() or "qgroup"
    except FileNotFoundError:  # kernels before 6.7 know full qgroups only
        return "qgroup"


def enable(path: Path) -> str:
    """Turn quotas on for the filesystem holding ``path`` (simple quotas) unless they are on; return the mode.

    Raises :class:`QuotaUnavailableError` when the kernel cannot (no simple quotas: Linux before 6.7)."""
    current = mode(path)
    if current is not None:
        return current
    arg = bytearray(struct.pack("QQ", QUOTA_CTL_ENABLE_SIMPLE, 0))
    try:
        _ioctl(path, BTRFS_IOC_QUOTA_CTL, arg)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            raise QuotaUnavailableError(
                exc.errno, "btrfs simple quotas are not available (Linux 6.7 or later is needed)"
            ) from exc
        raise
    return mode(path) or "squota"


def set_limit(subvolume: Path, limit_bytes: int | None) -> None:
    """Limit the bytes subvolume ``subvolume`` may own (None: no limit). One ioctl, no transaction commit."""
    flags = 0 if limit_bytes is None else QGROUP_LIMIT_MAX_EXCL
    arg = bytearray(struct.pack("QQQQQQ", 0, flags, 0, limit_bytes or 0, 0, 0))  # qgroup 0: the fd's subvolume
    _ioctl(subvolume, BTRFS_IOC_QGROUP_LIMIT, arg)


def usage(subvolume: Path) -> int | None:
    """Bytes charged to the subvolume (None: quotas off or its qgroup is gone)."""
    try:
        f = SYSFS / fsid(subvolume) / "qgroups" / f"0_{subvolume_id(subvolume)}" / "exclusive"
        return int(f.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
