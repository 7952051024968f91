"""Shift the ownership of a rootfs tree into a sandbox's host id range (root inside = ``idmap.host_base``)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from branchbox.backends.base import IdMap

_OVERFLOW_ID = 65534  # ids outside the mapped range become "nobody" inside the sandbox
_CAP_XATTR = "security.capability"


def shift_id(value: int, idmap: IdMap) -> int:
    """Host id for a sandbox-side id (out-of-range ids map to nobody)."""
    if 0 <= value < idmap.count:
        return idmap.host_base + value
    return idmap.host_base + _OVERFLOW_ID


def _shift_one(path: str, st: os.stat_result, idmap: IdMap) -> None:
    _chown_keeping_bits(path, st, shift_id(st.st_uid, idmap), shift_id(st.st_gid, idmap))


def _chown_keeping_bits(path: str, st: os.stat_result, uid: int, gid: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        os.lchown(path, uid, gid)
        return
    # chown clears setuid/setgid bits and file capabilities: save both and put them back afterwards.
    caps: bytes | None = None
    if stat.S_ISREG(st.st_mode):
        try:
            caps = os.getxattr(path, _CAP_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    os.lchown(path, uid, gid)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    if caps is not None:
        os.setxattr(path, _CAP_XATTR, caps, follow_symlinks=False)


def shift_tree(root: Path, idmap: IdMap) -> None:
    """Add ``idmap.host_base`` to the owner and group of every entry under ``root`` (``root`` included).

    Never follows symlinks; hard-linked inodes are shifted once.
    """
    seen: set[tuple[int, int]] = set()

    def visit(path: str, st: os.stat_result) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return
            seen.add(key)
        _shift_one(path, st, idmap)

    top = str(root)
    visit(top, os.lstat(top))
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            visit(path, os.lstat(path))


def rebase_id(value: int, base: int, idmap: IdMap) -> int:
    """The id in ``idmap``'s range of host id ``value`` of the range starting at ``base`` (other ids: unchanged)."""
    if base <= value < base + idmap.count:
        return idmap.host_base + value - base
    return value


def rebase_tree(root: Path, bases: set[int], idmap: IdMap) -> None:
    """Move the owners of every entry under ``root`` from any of the ranges starting at ``bases`` into
    ``idmap``'s range (uid x of a range stays uid x inside); setuid/setgid bits and file capabilities are kept."""
    ranges = sorted(bases)

    def rebase(value: int) -> int:
        for base in ranges:
            if base <= value < base + idmap.count:
                return idmap.host_base + value - base
        return value

    seen: set[tuple[int, int]] = set()

    def visit(path: str) -> None:
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
        uid, gid = rebase(st.st_uid), rebase(st.st_gid)
        if (uid, gid) != (st.st_uid, st.st_gid):
            _chown_keeping_bits(path, st, uid, gid)

    visit(str(root))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            visit(os.path.join(dirpath, name))
