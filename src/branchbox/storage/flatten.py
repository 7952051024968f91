"""Merge a chain of overlay layers into one, with overlay's own rules (``userxattr`` mounts).

Applied bottom-up: the bottom layer is copied, then each higher layer is applied on the result. A whiteout
(char device 0/0) replaces whatever is below and stays a whiteout (it may hide a template file further down). An
opaque directory (``user.overlay.opaque=y``) replaces the directory below. A directory that replaces a
non-directory is marked opaque, so the flat layer does not merge it with a template directory the chain had
hidden. Hard links between files of different layers are not kept (each link becomes its own copy).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from branchbox.storage.fsutil import OPAQUE_XATTR, copy_tree


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def flatten_into(layers: Sequence[Path], dest: Path) -> None:
    """Build ``dest`` (must not exist) from ``layers``, topmost first."""
    if not layers:
        raise ValueError("flatten needs at least one layer")
    copy_tree(layers[-1], dest)
    for layer in reversed(layers[:-1]):
        _apply(str(layer), str(dest))
        _copy_meta(str(layer), str(dest))


def _apply(src_dir: str, dst_dir: str) -> None:
    with os.scandir(src_dir) as it:
        entries = list(it)
    for e in entries:
        s = e.path
        d = os.path.join(dst_dir, e.name)
        st = e.stat(follow_symlinks=False)
        try:
            dst = os.lstat(d)
        except FileNotFoundError:
            dst = None
        if stat.S_ISDIR(st.st_mode):
            if dst is not None and stat.S_ISDIR(dst.st_mode) and not is_opaque(s):
                _apply(s, d)
                _copy_meta(s, d)
                continue
            if dst is not None:
                _remove(d, dst)
            copy_tree(Path(s), Path(d))
            if dst is not None and not is_opaque(s):
                os.setxattr(d, OPAQUE_XATTR, b"y")
            continue
        if dst is not None:
            _remove(d, dst)
        _copy_node(s, d, st)


def _copy_node(src: str, dst: str, st: os.stat_result) -> None:
    """Copy one non-directory with its owner, mode, times and xattrs."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst)
    else:  # whiteouts, other devices, fifos, sockets
        os.mknod(dst, st.st_mode, st.st_rdev)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(src, follow_symlinks=False):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _copy_meta(src: str, dst: str) -> None:
    """Owner, mode, xattrs and times of directory ``src`` onto ``dst`` (the upper layer's attributes win)."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src):
        os.setxattr(dst, name, os.getxattr(src, name))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
