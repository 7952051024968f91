"""btrfs qgroups: per-subvolume disk limits (a sandbox's writable layer) by ioctl, no subprocess.

The data dir's filesystem gets *simple quotas* (``squota``, Linux 6.7+): an extent is charged once, to the
subvolume that wrote it, at allocation, so accounting costs nothing at snapshot time (full qgroups walk shared
extents on every commit and made snapshots of busy trees slower). A clone of a layer (a restore's upper) is charged
only for what it writes afterwards. A filesystem that already has full qgroups keeps them: limits then apply to the
subvolume's exclusive bytes, which is the same figure for what a sandbox writes.

Limits are ``max_excl`` of the subvolume's level-0 qgroup: a write past it fails with ``EDQUOT`` ("Disk quota
exceeded") inside the sandbox, and nothing else on the filesystem is affected. Every sandbox upper of a daemon is
also a member of the daemon's level-1 qgroup (``group_id`` of its data dir), whose limit keeps the daemon's
reserve free: all its sandboxes together cannot fill the filesystem. Quotas are per filesystem: enabling
them on a filesystem several daemons share changes nothing for the others (their subvolumes get qgroups without a
limit). Deleting a subvolume drops its qgroup once its extents are freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

_TYPE = 0x94


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_TYPE << 8) | nr


_W, _R = 1, 2
BTRFS_IOC_INO_LOOKUP = _ioc(_R | _W, 18, 4096)
BTRFS_IOC_FS_INFO = _ioc(_R, 31, 1024)
BTRFS_IOC_QUOTA_CTL = _ioc(_R | _W, 40, 16)
BTRFS_IOC_QGROUP_ASSIGN = _ioc(_W, 41, 24)
BTRFS_IOC_QGROUP_CREATE = _ioc(_W, 42, 16)
BTRFS_IOC_QGROUP_LIMIT = _ioc(_R, 43, 48)  # _IOR in the kernel's header, although it only reads the argument
QUOTA_CTL_ENABLE_SIMPLE = 4
QGROUP_LIMIT_MAX_EXCL = 1 << 1
QGROUP_INHERIT_SET_LIMITS = 1 << 0
_INHERIT_SIZE = 72  # flags, num_qgroups, num_ref_copies, num_excl_copies, btrfs_qgroup_limit (5 x u64)
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


def set_limit(path: Path, limit_bytes: int | None, qgroup: int = 0) -> None:
    """Limit the bytes qgroup ``qgroup`` may own (None: no limit); 0 is the level-0 qgroup of the subvolume
    holding ``path``. One ioctl, no transaction commit."""
    flags = 0 if limit_bytes is None else QGROUP_LIMIT_MAX_EXCL
    arg = bytearray(struct.pack("QQQQQQ", qgroup, flags, 0, limit_bytes or 0, 0, 0))
    _ioctl(path, BTRFS_IOC_QGROUP_LIMIT, arg)


class Inherit:
    """What a new subvolume starts with (``btrfs_qgroup_inherit``): membership of ``groups`` and a limit, applied
    by the ioctl that creates it, in the same transaction: no window in which it writes unlimited, no ioctl more."""

    def __init__(self, groups: Sequence[int], limit_bytes: int | None) -> None:
        self._buf = ctypes.create_string_buffer(_INHERIT_SIZE + 8 * len(groups))
        struct.pack_into(
            "QQQQQQQQQ", self._buf, 0,
            QGROUP_INHERIT_SET_LIMITS if limit_bytes else 0, len(groups), 0, 0,  # flags, qgroups, (deprecated) copies
            QGROUP_LIMIT_MAX_EXCL if limit_bytes else 0, 0, limit_bytes or 0, 0, 0,  # btrfs_qgroup_limit
        )  # fmt: skip
        for i, q in enumerate(groups):
            struct.pack_into("Q", self._buf, _INHERIT_SIZE + 8 * i, q)

    @property
    def size(self) -> int:
        return len(self._buf.raw)

    @property
    def address(self) -> int:
        """Where the struct is (valid while this object lives)."""
        return ctypes.addressof(self._buf)


def group_id(key: str) -> int:
    """A level-1 qgroup id for ``key`` (a data dir's real path): 48 bits of its sha256, so daemons sharing a
    filesystem get groups of their own."""
    digest = hashlib.sha256(key.encode()).digest()
    return (1 << 48) | int.from_bytes(digest[:6], "big")


def create_group(path: Path, qgroup: int) -> None:
    """Make qgroup ``qgroup`` on the filesystem holding ``path``; one that exists is fine."""
    with contextlib.suppress(FileExistsError):
        _ioctl(path, BTRFS_IOC_QGROUP_CREATE, bytearray(struct.pack("QQ", 1, qgroup)))


def assign(subvolume: Path, qgroup: int) -> None:
    """Make the subvolume's level-0 qgroup a member of ``qgroup`` (its bytes count there too)."""
    arg = bytearray(struct.pack("QQQ", 1, subvolume_id(subvolume), qgroup))
    with contextlib.suppress(FileExistsError):
        _ioctl(subvolume, BTRFS_IOC_QGROUP_ASSIGN, arg)


def _name(qgroup: int) -> str:
    return f"{qgroup >> 48}_{qgroup & ((1 << 48) - 1)}"


def usage(path: Path, qgroup: int = 0) -> int | None:
    """Bytes charged to ``qgroup`` (0: the subvolume holding ``path``); None: quotas off or no such qgroup."""
    try:
        name = _name(qgroup) if qgroup else f"0_{subvolume_id(path)}"
        return int((SYSFS / fsid(path) / "qgroups" / name / "exclusive").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
