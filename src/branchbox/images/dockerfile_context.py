"""The build context of a Dockerfile build: a tar the client sent, read in place (never unpacked on the host).

COPY/ADD sources are looked up in the tar's index. Source paths are resolved inside the context as if it were
``/`` (``..`` that climbs out is refused, a symlink is followed only within the context: ``link -> /etc/passwd``
means the context's own ``etc/passwd``), so nothing of the daemon's host can be copied into a template. The files
a step copies are re-packed into a tar (owners root, modes kept) that the sandbox's agent unpacks, and hashed
(names, types, modes, link targets, contents) for the step's cache key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from branchbox.errors import TemplateSpecError

DOCKERFILE_MEMBER = ".branchbox.Dockerfile"  # where clients put a Dockerfile that is not inside the context
_MAX_HOPS = 40
_SPOOL = 8 << 20
MAX_STEP_BYTES = 4 << 30  # what one COPY/ADD may stage on the host (a gzip bomb in the context or an ADD tar)


def _too_big(what: str) -> TemplateSpecError:
    return TemplateSpecError(
        f"{what} is larger than {MAX_STEP_BYTES >> 30} GiB unpacked: copy less per step, or fetch large data in a "
        "RUN step"
    )


@dataclass(frozen=True, slots=True)
class Source:
    """One context entry a step copies: ``name`` in the context, ``dest`` relative to the destination dir."""

    name: str
    dest: str
    member: tarfile.TarInfo | None  # None: a directory implied by its files


class Context:
    """An index of a context tar (names normalised, no leading ``./``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as exc:
            raise TemplateSpecError(f"the build context is not a tar archive: {exc}") from exc
        self.members: dict[str, tarfile.TarInfo] = {}
        self.dirs: set[str] = {""}
        for m in self._tar.getmembers():
            name = posixpath.normpath("/" + m.name).lstrip("/")
            if name in ("", "."):
                continue
            if m.isdev() or m.isfifo():
                continue
            self.members[name] = m
            parent = posixpath.dirname(name)
            while parent and parent not in self.dirs:
                self.dirs.add(parent)
                parent = posixpath.dirname(parent)
            if m.isdir():
                self.dirs.add(name)

    def close(self) -> None:
        self._tar.close()

    def read(self, name: str) -> bytes:
        """Content of the regular file ``name`` (a Dockerfile)."""
        m = self.members.get(name)
        if m is None or not (m.isfile() or m.islnk()):
            raise TemplateSpecError(f"the build context has no file {name!r}: send the Dockerfile with the context")
        fh = self._tar.extractfile(m)
        assert fh is not None
        return fh.read()

    def _open(self, m: tarfile.TarInfo) -> IO[bytes]:
        fh = self._tar.extractfile(m)
        if fh is None:
            raise TemplateSpecError(f"cannot read {m.name!r} from the build context")
        return fh

    def resolve(self, path: str) -> str:
        """The context name ``path`` refers to, following symlinks inside the context only."""
        pending = [p for p in path.split("/") if p not in ("", ".")]
        parts: list[str] = []
        hops = 0
        while pending:
            comp = pending.pop(0)
            if comp == "..":
                if parts:
                    parts.pop()
                continue
            name = "/".join([*parts, comp])
            m = self.members.get(name)
            if m is not None and m.issym():
                hops += 1
                if hops > _MAX_HOPS:
                    raise TemplateSpecError(f"too many levels of symlinks resolving {path!r} in the build context")
                if m.linkname.startswith("/"):
                    parts = []
                pending = [p for p in m.linkname.split("/") if p not in ("", ".")] + pending
                continue
            parts.append(comp)
        return "/".join(parts)

    def exists(self, name: str) -> bool:
        return name in self.members or name in self.dirs

    def is_dir(self, name: str) -> bool:
        return name in self.dirs

    def match(self, pattern: str) -> list[str]:
        """Context names matching a COPY wildcard (``*``, ``?``, ``[...]``, per path component)."""
        depth = pattern.count("/")
        names = sorted(set(self.members) | (self.dirs - {""}))
        return [n for n in names if n.count("/") == depth and fnmatch.fnmatchcase(n, pattern)]

    def under(self, directory: str) -> Iterator[tuple[str, tarfile.TarInfo | None]]:
        """Entries below ``directory`` (not following symlinks), with names relative to it."""
        prefix = directory + "/" if directory else ""
        for d in sorted(self.dirs):
            if d and d.startswith(prefix) and d not in self.members:
                yield d[len(prefix) :], None
        for name, m in sorted(self.members.items()):
            if name.startswith(prefix) and name != DOCKERFILE_MEMBER:
                yield name[len(prefix) :], m

    def digest(self, sources: list[Source]) -> str:
        """sha256 over the names, types, modes, link targets and contents of ``sources``."""
        h = hashlib.sha256()
        for s in sources:
            m = s.member
            if m is None:
                h.update(f"D\0{s.dest}\0".encode())
                continue
            h.update(f"{m.type!r}\0{s.dest}\0{m.mode:o}\0{m.linkname}\0".encode())
            if m.isfile() or m.islnk():
                with self._open(m) as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
        return h.hexdigest()

    def pack(self, sources: list[Source]) -> IO[bytes]:
        """A tar of ``sources`` under their ``dest`` names, owned by root (a spooled temporary file, at 0)."""
        if sum(s.member.size for s in sources if s.member is not None) > MAX_STEP_BYTES:
            raise _too_big("what this step copies")
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - the caller closes it
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as out:
            for s in sources:
                m = s.member
                if m is None:
                    info = tarfile.TarInfo(s.dest)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    out.addfile(info)
                    continue
                info = tarfile.TarInfo(s.dest)
                info.mode = m.mode & 0o7777
                info.mtime = m.mtime
                if m.isdir():
                    info.type = tarfile.DIRTYPE
                    out.addfile(info)
                elif m.issym():
                    info.type = tarfile.SYMTYPE
                    info.linkname = m.linkname
                    out.addfile(info)
                else:  # regular files, and hard links as copies
                    info.size = m.size if m.isfile() else self._link_size(m)
                    with self._open(m) as fh:
                        out.addfile(info, fh)
        spool.seek(0)
        return spool

    def _link_size(self, m: tarfile.TarInfo) -> int:
        with self._open(m) as fh:
            return len(fh.read())

    def open_archive(self, name: str) -> tarfile.TarFile | None:
        """The context file ``name`` opened as a (possibly compressed) tar, for ADD; None when it is not one."""
        m = self.members.get(name)
        if m is None or not (m.isfile() or m.islnk()):
            return None
        data = self._open(m).read()
        try:
            return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except tarfile.TarError:
            return None


def normalise_source(src: str, where: str) -> str:
    """A COPY source as a context name; ``..`` that leaves the context is refused."""
    norm = posixpath.normpath(src) if src else "."
    if norm == ".." or norm.startswith("../"):
        raise TemplateSpecError(f"{where}: {src!r} is outside the build context: sources are paths inside it")
    return posixpath.normpath("/" + norm).lstrip("/")


def repack_archive(archive: tarfile.TarFile) -> IO[bytes]:
    """An ADD archive as a plain tar the agent can unpack (owners root, devices dropped, links kept)."""
    members = [m for m in archive.getmembers() if not (m.isdev() or m.isfifo())]
    if sum(m.size for m in members) > MAX_STEP_BYTES:
        raise _too_big("the ADD archive")
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - the caller closes it
    try:
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as out:
            for m in members:
                info = m.replace(uid=0, gid=0, uname="", gname="", deep=False)
                out.addfile(info, archive.extractfile(m) if m.isfile() else None)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool
