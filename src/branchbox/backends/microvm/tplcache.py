"""Old memory-template generations in the cache: which ones nothing needs any more, and their removal.

A generation is ``CACHE/memtemplates/<key>/<gen>/`` (device state, disk, machine) plus its RAM file on tmpfs. Once
its RAM file is gone (replaced by a template built for a new guest image, or tmpfs emptied by a reboot) no VM can
start from it, but its disk may still be the backing file of running VMs' overlays and of memory snapshot layers
(``layers/<id>/disk.qcow2`` -> ... -> the template disk). A generation is removed only when no qcow2 chain of any
data dir using this cache reaches its disk and no process has the disk open, at two sweeps ``GRACE_S`` apart (the
first marks it ``.unused-since``): a VM or snapshot being made at the moment of one sweep is seen by the next.

Data dirs register in ``CACHE/memtemplates/.users/`` (a symlink per data dir) when their backend starts, so one
data dir's sweep sees the VMs and layers of the others sharing the cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import time
from collections.abc import Iterable
from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 64
GRACE_S = 600.0
UNUSED = ".unused-since"


def root(cache: Path) -> Path:
    return cache / "memtemplates"


def register_user(cache: Path, data_dir: Path) -> None:
    """Record that ``data_dir`` has VMs and layers on this cache's templates (idempotent; drops the records of
    data dirs that are gone)."""
    d = root(cache) / ".users"
    d.mkdir(parents=True, exist_ok=True)
    users(cache)
    st = os.stat(data_dir)
    link = d / f"{st.st_dev:x}-{st.st_ino:x}"
    if os.path.islink(link) and os.readlink(link) == str(data_dir):
        return
    tmp = d / f".{link.name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(data_dir)
    tmp.rename(link)


def users(cache: Path) -> list[Path]:
    """Registered data dirs that still exist (stale registrations are dropped)."""
    out = []
    d = root(cache) / ".users"
    for link in d.iterdir() if d.is_dir() else []:
        try:
            target = Path(os.readlink(link)) if link.is_symlink() else None
        except FileNotFoundError:  # another daemon's start dropped it (stale) between the listing and here
            continue
        if target is not None and target.is_dir():
            out.append(target)
        elif not link.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
    return out


def backing_file(path: Path) -> Path | None:
    """The backing file named in a qcow2 header (relative names are relative to ``path``'s dir), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if offset == 0 or size == 0:
                return None
            f.seek(offset)
            name = f.read(size).decode(errors="surrogateescape")
    except OSError:
        return None
    return Path(name) if os.path.isabs(name) else path.parent / name


def referenced(data_dirs: Iterable[Path]) -> set[Path]:
    """Every file the qcow2 chains of these data dirs' VM disks and memory snapshot layers reach."""
    seen: set[Path] = set()
    for d in data_dirs:
        tops = [*(d / "vm" / "run").glob("*/disk.qcow2"), *(d / "layers").glob("*/disk.qcow2")]
        for top in tops:
            cur: Path | None = top
            for _ in range(MAX_CHAIN):
                if cur is None:
                    break
                cur = backing_file(cur)
                if cur is not None:
                    seen.add(Path(os.path.realpath(cur)))
    return seen


def open_under(directory: Path) -> set[Path]:
    """Files below ``directory`` that some process on this host has open (QEMU holds its disk's backing chain)."""
    prefix = os.path.realpath(directory) + os.sep
    found: set[Path] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix):
                        found.add(Path(target))
    return found


def sweep(cache: Path, template_shm: Path, *, grace_s: float = GRACE_S) -> list[Path]:
    """Remove the generations whose RAM file is gone and whose disk nothing has used for ``grace_s`` (wall clock:
    sweeps run in different processes); returns the removed dirs."""
    base = root(cache)
    if not base.is_dir():
        return []
    candidates = []
    for key_dir in base.iterdir():
        if key_dir.name.startswith(".") or not key_dir.is_dir() or key_dir.is_symlink():
            continue
        for gen in key_dir.iterdir():
            if gen.name.startswith(".") or gen.is_symlink() or not gen.is_dir():
                continue  # "current", and builds in progress (".<gen>.<vm>")
            if not (template_shm / f"{key_dir.name}-{gen.name}.ram").exists():
                candidates.append(gen)
    if not candidates:
        return []
    busy = referenced(users(cache)) | open_under(base)
    removed = []
    now = time.time()
    for gen in candidates:
        disk = Path(os.path.realpath(gen / "disk.qcow2"))
        marker = gen / UNUSED
        if disk in busy:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
            continue
        try:
            since = float(marker.read_text())
        except (OSError, ValueError):
            since = now
            marker.write_text(f"{now}\n")
        if now - since < grace_s:
            continue
        shutil.rmtree(gen, ignore_errors=True)
        removed.append(gen)
        key_dir = gen.parent
        current = key_dir / "current"
        if current.is_symlink() and not current.exists():
            with contextlib.suppress(FileNotFoundError):
                current.unlink()
        with contextlib.suppress(OSError):
            key_dir.rmdir()  # only when nothing is left
    return removed
