"""Filesystem helpers shared by the storage drivers: durable copies, syncfs, disk usage, statfs."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import stat
import subprocess
from pathlib import Path

from branchbox.errors import BackendError
from branchbox.storage.base import LayerInfo

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]

BTRFS_SUPER_MAGIC = 0x9123683E
OPAQUE_XATTR = "user.overlay.opaque"


def fs_type(path: Path) -> int:
    """``statfs(2)`` f_type of the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return int.from_bytes(buf.raw[:8], "little", signed=True) & 0xFFFFFFFF


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree(src: Path, dest: Path) -> None:
    """``cp -a --reflink=auto``: owners, modes, times, xattrs, hard links and device nodes (whiteouts) kept."""
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", str(src), str(dest)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BackendError(f"copy of {src} failed: {proc.stderr.decode(errors='replace').strip()}")


def disk_usage(path: Path) -> LayerInfo:
    """Allocated bytes and entry count under ``path``; hard links counted once; other filesystems skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    files = 0
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                files += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                elif st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
    return LayerInfo(path=path, size_bytes=total, files=files)


async def disk_usage_niced(path: Path) -> LayerInfo:
    """``disk_usage`` measured by ``du`` in niced child processes, for background measurements: a walk of a
    large layer then neither holds the daemon's GIL (a thread walking 20k files made snapshots taken meanwhile
    100x slower) nor competes with users' work for the CPU. ``files`` counts inodes (hard links once)."""

    async def du(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            "nice", "-n", "19", "du", "-s", "-x", *args, "--", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise OSError(f"du {path} failed: {err.decode(errors='replace').strip()}")
        return int(out.split()[0])

    size = await du("-B1")
    inodes = await du("--inodes")
    return LayerInfo(path=path, size_bytes=size, files=max(0, inodes - 1))  # the layer's own root not counted
