"""The ``btrfs`` storage driver: every sandbox upper is a subvolume; a frozen layer is a read-only snapshot.

Used when the data dir is on btrfs. Snapshots and deletions are ioctls (``BTRFS_IOC_SNAP_CREATE_V2``,
``BTRFS_IOC_SNAP_DESTROY``): no subprocess, O(1) in the number of files, and durable on return (creating a
snapshot commits a btrfs transaction). A restore clones the snapshot's layer as the child's writable upper
(another O(1) snapshot), so chains of layers never grow on this driver.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.storage import quota
from branchbox.storage.base import LayerInfo, SandboxDirs
from branchbox.storage.flatten import flatten_into
from branchbox.storage.fsutil import disk_usage, fsync_dir, syncfs
from branchbox.storage.overlay import remove_sandbox_dirs

_ARGS_SIZE = 4096
_IOW = (1 << 30) | (_ARGS_SIZE << 16) | (0x94 << 8)
BTRFS_IOC_SUBVOL_CREATE = _IOW | 14
BTRFS_IOC_SNAP_DESTROY = _IOW | 15
BTRFS_IOC_SNAP_CREATE_V2 = _IOW | 23
BTRFS_IOC_SUBVOL_CREATE_V2 = _IOW | 24
BTRFS_SUBVOL_RDONLY = 1 << 1
BTRFS_SUBVOL_QGROUP_INHERIT = 1 << 2
BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
_NAME_MAX_V1 = 4087
_V2_NAME_OFFSET = 56


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _vol_args(name: str, fd: int = 0) -> bytearray:
    raw = os.fsencode(name)
    if len(raw) > _NAME_MAX_V1 or b"/" in raw:
        raise ValueError(f"bad subvolume name {name!r}")
    buf = bytearray(_ARGS_SIZE)
    struct.pack_into("q", buf, 0, fd)
    buf[8 : 8 + len(raw)] = raw
    return buf


def _vol_args_v2(name: str, fd: int, flags: int, inherit: quota.Inherit | None) -> bytearray:
    raw = os.fsencode(name)
    if len(raw) >= _ARGS_SIZE - _V2_NAME_OFFSET or b"/" in raw:
        raise ValueError(f"bad subvolume name {name!r}")
    buf = bytearray(_ARGS_SIZE)
    if inherit is not None:
        flags |= BTRFS_SUBVOL_QGROUP_INHERIT
        struct.pack_into("QQ", buf, 24, inherit.size, inherit.address)
    struct.pack_into("qQQ", buf, 0, fd, 0, flags)
    buf[_V2_NAME_OFFSET : _V2_NAME_OFFSET + len(raw)] = raw
    return buf


def create_subvolume(path: Path, *, inherit: quota.Inherit | None = None) -> None:
    """Create subvolume ``path``; ``inherit``: its qgroups and limit, set by the same ioctl."""
    parent = _dir_fd(path.parent)
    try:
        if inherit is None:
            fcntl.ioctl(parent, BTRFS_IOC_SUBVOL_CREATE, _vol_args(path.name))
        else:
            fcntl.ioctl(parent, BTRFS_IOC_SUBVOL_CREATE_V2, _vol_args_v2(path.name, 0, 0, inherit))
    finally:
        os.close(parent)


def snapshot(src: Path, dest: Path, *, readonly: bool, inherit: quota.Inherit | None = None) -> None:
    """Snapshot subvolume ``src`` as ``dest`` (a new subvolume); ``inherit`` as for ``create_subvolume``."""
    src_fd = _dir_fd(src)
    try:
        buf = _vol_args_v2(dest.name, src_fd, BTRFS_SUBVOL_RDONLY if readonly else 0, inherit)
        parent = _dir_fd(dest.parent)
        try:
            fcntl.ioctl(parent, BTRFS_IOC_SNAP_CREATE_V2, buf)
        finally:
            os.close(parent)
    finally:
        os.close(src_fd)


def is_subvolume(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_ino == BTRFS_FIRST_FREE_OBJECTID and os.path.isdir(path) and not os.path.islink(path)


def delete_subvolume(path: Path) -> None:
    """Delete a subvolume (read-only ones too) with its content. Missing is fine."""
    if not is_subvolume(path):
        return
    parent = _dir_fd(path.parent)
    try:
        fcntl.ioctl(parent, BTRFS_IOC_SNAP_DESTROY, _vol_args(path.name))
    finally:
        os.close(parent)


class BtrfsDriver:
    """Subvolume uppers, read-only snapshot layers, clone-on-restore.

    The overlay needs its upper and work dirs on one filesystem *and* one subvolume (it renames between them),
    so a sandbox has a subvolume ``fs`` holding ``fs/upper`` and ``fs/work``; a layer is a read-only snapshot
    of that subvolume and mounts ``layer/upper`` as a lower.
    """

    name = "btrfs"
    clones_layers = True

    def __init__(self, quota_mode: str | None = None, data_dir: Path | None = None) -> None:
        """``quota_mode``: the filesystem's quotas (storage/quota.py), None when off; with ``data_dir``, every
        upper joins the data dir's group (the reserve's limit)."""
        self.disk_limits: str | None = None if quota_mode is None else f"btrfs {quota_mode}"
        self._root = data_dir
        self._group: int | None = None
        if quota_mode == "squota" and data_dir is not None:  # full qgroups: a clone joining a group would make
            # the accounting inconsistent (a rescan); there the reserve only refuses new work
            self._group = quota.group_id(os.path.realpath(data_dir))
            quota.create_group(data_dir, self._group)

    def set_disk_limit(self, sandbox_dir: Path, disk_mb: int) -> None:
        fs = sandbox_dir / "fs"
        quota.set_limit(fs, disk_mb << 20 if disk_mb > 0 else None)  # ~5 us
        if self._group is not None:
            quota.assign(fs, self._group)  # one it is in already: nothing to do

    def keep_free(self, reserve_bytes: int) -> tuple[int, int] | None:
        if self._group is None or self._root is None:
            return None
        used = quota.usage(self._root, self._group) or 0
        st = os.statvfs(self._root)
        limit = max(used, used + st.f_bavail * st.f_frsize - reserve_bytes)
        quota.set_limit(self._root, limit if reserve_bytes > 0 else None, self._group)
        return used, limit

    def upper_dir(self, sandbox_dir: Path) -> Path:
        return sandbox_dir / "fs" / "upper"

    def layer_lower(self, layer: Path) -> Path:
        return layer / "upper"

    def prepare_sandbox(
        self, sandbox_dir: Path, idmap: IdMap, *, base: Path | None = None, disk_mb: int = 0
    ) -> SandboxDirs:
        sandbox_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(sandbox_dir, 0o711)  # noqa: S103 - no listing; fs/upper and fs/work belong to the sandbox uid
        fs = sandbox_dir / "fs"
        if not is_subvolume(fs):
            inherit = None  # no quotas: plain subvolumes
            if self.disk_limits is not None:  # its limit and the daemon's group, by the ioctl that makes it
                inherit = quota.Inherit([] if self._group is None else [self._group], disk_mb << 20 or None)
            if base is not None:
                snapshot(base, fs, readonly=False, inherit=inherit)
                shutil.rmtree(fs / "work", ignore_errors=True)  # the layer's stale overlay work dir
            else:
                create_subvolume(fs, inherit=inherit)
            os.chmod(fs, 0o711)  # noqa: S103 - traversal only
        elif self.disk_limits is not None:  # kept from before (a restart's prepare): limit and group again
            self.set_disk_limit(sandbox_dir, disk_mb)
        upper, work = fs / "upper", fs / "work"
        for d in (upper, work):
            if not d.exists():
                d.mkdir()
                os.chown(d, idmap.host_base, idmap.host_base)
                os.chmod(d, 0o755)  # noqa: S103 - the overlay root directory mode
        run = sandbox_dir / "run"
        run.mkdir(exist_ok=True)
        os.chown(run, 0, 0)
        os.chmod(run, 0o700)
        return SandboxDirs(upper, work, run)

    def remove_sandbox(self, sandbox_dir: Path) -> None:
        delete_subvolume(sandbox_dir / "fs")
        remove_sandbox_dirs(sandbox_dir)

    def freeze_upper(self, upper: Path, dest: Path, *, durable: bool = True) -> LayerInfo:
        delete_subvolume(dest)
        snapshot(upper.parent, dest, readonly=True)
        if durable:
            fsync_dir(dest.parent)
        return LayerInfo(path=dest)

    def remove_layer(self, path: Path) -> None:
        if is_subvolume(path):
            delete_subvolume(path)
        else:
            remove_sandbox_dirs(path)

    def flatten(self, layers: Sequence[Path], dest: Path) -> LayerInfo:
        tmp = dest.with_name(dest.name + ".tmp")
        self.remove_layer(tmp)
        create_subvolume(tmp)
        try:
            os.chmod(tmp, 0o711)  # noqa: S103 - traversal only
            flatten_into(layers, tmp / "upper")  # cp --reflink shares the data extents of the bottom layer
            syncfs(tmp)
            os.rename(tmp, dest)
        except BaseException:
            delete_subvolume(tmp)
            raise
        fsync_dir(dest.parent)
        return disk_usage(dest)

    def disk_usage(self, path: Path) -> LayerInfo:
        return disk_usage(path)
