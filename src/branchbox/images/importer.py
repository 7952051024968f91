"""Safe extraction of a rootfs tarball into a template directory, and rootfs sanity checks.

Members with absolute names or ``..`` components, writes through symlinks that leave the root and hard links
to outside files are refused; device nodes are skipped; owners are shifted by ``idmap.host_base``. Symlinks
themselves may point anywhere (absolute targets are resolved inside the sandbox, never on the host).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from branchbox.backends.base import IdMap
from branchbox.errors import TemplateBuildError, TemplateSpecError
from branchbox.images.shift import shift_id

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_SYMLINKS = 40


def resolve_in_root(root: Path, path: str) -> Path:
    """Host path of sandbox ``path``, following symlinks as if ``root`` were ``/`` (never leaves ``root``)."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    parts: list[str] = []
    hops = 0
    while pending:
        comp = pending.pop(0)
        if comp == "..":
            if parts:
                parts.pop()
            continue
        candidate = root.joinpath(*parts, comp)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            parts.append(comp)
            continue
        if not stat.S_ISLNK(st.st_mode):
            parts.append(comp)
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            raise TemplateBuildError(f"too many levels of symlinks resolving {path!r} in the rootfs")
        target = os.readlink(candidate)
        if target.startswith("/"):
            parts = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return root.joinpath(*parts)


def python_version_from_name(host_path: Path) -> str:
    """'3.11' from a resolved interpreter file name like python3.11 ('' when it does not say)."""
    m = re.fullmatch(r"python(\d+\.\d+)", host_path.name)
    return m.group(1) if m else ""


def has_executable(root: Path, path: str) -> bool:
    """True when ``path`` (resolved inside the rootfs) is an executable file."""
    f = resolve_in_root(root, path)
    return f.is_file() and bool(os.stat(f).st_mode & 0o111)


def has_shell(root: Path) -> bool:
    """True when the rootfs has an executable /bin/sh (command strings run under it; argv lists do not need it)."""
    return has_executable(root, "/bin/sh")


def check_rootfs(root: Path, python: str | None) -> Path | None:
    """An image needs nothing but files: the agent is branchbox's own (the host's Python, forked from the zygote
    in containers, a read-only runtime disk in microVMs), never the image's. Only an interpreter the caller named
    (``python``, recorded in the template's metadata) must be there. Returns its resolved host path."""
    if not any(root.iterdir()):
        raise TemplateSpecError("the rootfs is empty: make the tar with e.g. `tar -C ROOTFS -cf rootfs.tar .`")
    if python is None:
        return None
    py = resolve_in_root(root, python)
    if not py.is_file() or not os.stat(py).st_mode & 0o111:
        raise TemplateSpecError(
            f"no executable at {python!r} in the image; pass the path of the image's python3 as python=, or "
            "leave python out (the agent does not need it)"
        )
    return py


DEFAULT_PYTHON = "/usr/bin/python3"


def default_python(root: Path) -> Path | None:
    """The resolved host path of the image's ``/usr/bin/python3`` when it is an executable file (recorded in the
    template's metadata for callers that want it; the agent never needs it), else None."""
    py = resolve_in_root(root, DEFAULT_PYTHON)
    return py if py.is_file() and bool(os.stat(py).st_mode & 0o111) else None


def _within(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class _Filter:
    """tarfile extraction filter: refuses escapes, skips devices, shifts owners."""

    def __init__(self, idmap: IdMap) -> None:
        self.idmap = idmap
        self.skipped_devices = 0

    def _reject(self, member: tarfile.TarInfo, why: str) -> TemplateSpecError:
        return TemplateSpecError(
            f"refusing to import the rootfs tar: member {member.name!r} {why}; the tarball is unsafe or "
            "not a rootfs (make one with e.g. `tar -C ROOTFS -cf rootfs.tar .`)"
        )

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        name = member.name
        if name.startswith("/"):
            raise self._reject(member, "has an absolute path")
        if ".." in name.split("/"):
            raise self._reject(member, "contains '..'")
        if member.ischr() or member.isblk():
            self.skipped_devices += 1
            return None
        root = os.path.realpath(dest)
        target = os.path.realpath(os.path.join(root, name))
        if not _within(root, target):
            raise self._reject(member, "would be written outside the root (through a symlink)")
        if member.islnk():
            link = member.linkname
            if link.startswith("/") or ".." in link.split("/"):
                raise self._reject(member, f"is a hard link to {link!r} outside the root")
            if not _within(root, os.path.realpath(os.path.join(root, link))):
                raise self._reject(member, f"is a hard link to {link!r} outside the root")
        return member.replace(
            uid=shift_id(member.uid, self.idmap),
            gid=shift_id(member.gid, self.idmap),
            uname="",
            gname="",
            deep=False,
        )


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != _ZSTD_MAGIC:
        try:
            with tarfile.open(path, "r:*") as tar:
                yield tar
        except tarfile.ReadError as exc:
            raise TemplateSpecError(f"{path} is not a tar archive (plain, gz, bz2, xz or zst): {exc}") from exc
        return
    proc = subprocess.Popen(["zstd", "-dcq", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    stream: IO[bytes] = proc.stdout
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            yield tar
    finally:
        stream.close()
        proc.kill()
        proc.wait()


def extract_rootfs(tar_path: Path, dest: Path, idmap: IdMap) -> int:
    """Extract ``tar_path`` into the empty directory ``dest``; returns how many device nodes were skipped."""
    filt = _Filter(idmap)
    try:
        with _open_tar(tar_path) as tar:
            tar.errorlevel = 2
            tar.extractall(dest, numeric_owner=True, filter=filt)  # noqa: S202 - _Filter checks every member
    except FileNotFoundError as exc:
        raise TemplateSpecError(f"cannot read {tar_path}: {exc.strerror}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise TemplateBuildError(f"extracting {tar_path} failed: {exc}") from exc
    # Parents created implicitly by tarfile (and dest itself) are owned by host root: shift them too.
    for dirpath, dirnames, filenames in os.walk(dest):
        for p in (dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))):
            st = os.lstat(p)
            if st.st_uid < idmap.host_base or st.st_gid < idmap.host_base:
                os.lchown(p, shift_id(st.st_uid, idmap), shift_id(st.st_gid, idmap))
    return filt.skipped_devices
