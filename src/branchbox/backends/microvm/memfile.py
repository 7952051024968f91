"""Guest RAM files on tmpfs: sparse copies (only the pages the guest touched are copied)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy ``src`` to a new ``dst`` of the same size, skipping holes (SEEK_DATA/SEEK_HOLE). Returns bytes copied."""
    copied = 0
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fin).st_size
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fout, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fin, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole is left
                    raise
                end = os.lseek(fin, start, os.SEEK_HOLE)
                copied += _copy_range(fin, fout, start, end - start)
                pos = end
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return copied


def _copy_range(fin: int, fout: int, start: int, length: int) -> int:
    """``length`` bytes at ``start`` from ``fin`` to the same offset of ``fout``, in the kernel."""
    off, left = start, length
    try:
        while left > 0:
            n = os.copy_file_range(fin, fout, left, off, off)
            if n == 0:
                return length - left
            off += n
            left -= n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.lseek(fout, off, os.SEEK_SET)  # across filesystems (tmpfs -> disk): sendfile
        while left > 0:
            n = os.sendfile(fout, fin, off, left)
            if n == 0:
                break
            off += n
            left -= n
    return length - left


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_stale_templates(shm: Path, key: str) -> list[Path]:
    """Remove the RAM files of memory templates that ``key`` replaces: the same template digest and machine
    shape, built for another guest image (``<digest>-<accel>-<cpus>c-<mem>m-<image>-<generation>.ram``). Running
    VMs do not need them (each has its own copy), and no new VM starts from them: they would only fill tmpfs."""
    shape = key.rsplit("-", 1)[0] + "-"
    gone = []
    for f in shm.glob(f"{shape}*.ram") if shm.is_dir() else []:
        if not f.name.startswith(f"{key}-"):
            remove(f)
            gone.append(f)
    return gone


def shm_root(owner: Path, prefix: str = "branchbox") -> Path:
    """A tmpfs directory for the guest RAM files of ``owner`` (a data or cache dir):
    ``/dev/shm/<prefix>-<device>-<inode of owner>`` (the owner's path may be too long for a name)."""
    base = Path("/dev/shm")
    owner.mkdir(parents=True, exist_ok=True)
    if not base.is_dir():
        return owner / "ram"
    st = os.stat(owner)
    return base / f"{prefix}-{st.st_dev:x}-{st.st_ino:x}"
