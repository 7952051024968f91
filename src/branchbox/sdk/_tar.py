"""The local side of directory transfers: a local directory packed as a tar, and a sandbox's tar unpacked.

A sandbox's tar is untrusted input for the host: every member is checked before anything is written (no
absolute names, no ``..``, nothing written through a symlink; symlinks that point outside the target directory
and devices are left out), and on Pythons that have it ``tarfile``'s own ``data`` filter (PEP 706) runs too.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

SPOOL = 32 * 1024 * 1024  # a packed directory stays in memory up to this, then spills to a temporary file


def pack_dir(local: str | Path) -> IO[bytes]:
    """A pax tar of ``local``'s contents (names relative to it, owners root), rewound, ready to stream."""
    root = Path(local)
    if not root.is_dir():
        raise NotADirectoryError(f"not a local directory: {root}")
    out: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL)  # noqa: SIM115 - returned to the caller, who closes it
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name, filter=_as_root)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = int(info.mtime)  # a float would cost every member a pax header
    return info


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._rest:
            self._rest = next(self._chunks, b"")
            if not self._rest:
                return 0
        n = min(len(buf), len(self._rest))
        buf[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


Skipped = Callable[[str, str], object]  # (member name, why it was left out)


def unpack(chunks: Iterator[bytes] | IO[bytes], dest: str | Path, on_skipped: Skipped | None = None) -> int:
    """Unpack a tar stream into ``dest`` (created with its parents); the number of members written.
    ``on_skipped(name, why)`` hears of each member left out."""
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(root)
    # a file object is an Iterator too (of lines): test for it first
    fileobj = cast(IO[bytes], chunks) if hasattr(chunks, "read") else io.BufferedReader(_ChunkReader(chunks))
    extra: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    n = 0
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            why = check_member(member, real)
            if why:
                if on_skipped is not None:
                    on_skipped(member.name, why)
                continue
            tar.extract(member, root, **extra)
            n += 1
    return n


def check_member(member: tarfile.TarInfo, real_dest: str) -> str:
    """Why ``member`` is left out of the directory ``real_dest`` (a realpath), or "" to write it: devices, fifos
    and symlinks that point outside it are left out; a member that would write outside it raises ``ValueError``."""
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"refusing tar member {name!r}: it names a path outside the target directory")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return "not a regular file, directory or link"
    target = os.path.join(real_dest, name)
    if not _inside(os.path.realpath(os.path.dirname(target)), real_dest):
        raise ValueError(f"refusing tar member {name!r}: a symlink in its path leads outside the target directory")
    if member.issym():  # one pointing outside (an absolute one, say) is left out, not followed later
        link = os.path.realpath(os.path.join(os.path.dirname(target), member.linkname))
        if member.linkname.startswith("/") or not _inside(link, real_dest):
            return f"a symlink to {member.linkname} (outside the directory)"
    if member.islnk() and not _inside(os.path.realpath(os.path.join(real_dest, member.linkname)), real_dest):
        raise ValueError(f"refusing tar member {name!r}: its link {member.linkname!r} leads outside the target")
    member.mode &= 0o777  # no setuid, setgid or sticky bits from a sandbox
    return ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
