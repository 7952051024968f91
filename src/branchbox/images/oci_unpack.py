"""Apply one OCI layer (a plain, gzip or zstd tar) onto a root filesystem tree, safely.

OCI's changeset semantics: ``.wh.NAME`` deletes NAME of the layers below, ``.wh..wh..opq`` empties its directory
of what the layers below put there (entries of this layer stay), and an entry replaces what was at its path
unless both are directories. Paths are resolved inside the root (a parent that is a symlink is followed as the
sandbox would see it, never onto the host: ``importer.resolve_in_root``); absolute names and ``..`` are refused,
hard links must point at an existing non-directory inside the root, device nodes are skipped, owners are shifted
into the store's id range (``shift.shift_id``), setuid/setgid bits and ``security.capability`` survive. Every
entry counts against a :class:`Budget` (unpacked bytes, entries): a tar bomb stops with ``image_too_large``
before it fills the disk. The uncompressed stream (``layer_stream.LayerStream``: inflated and hashed on another
thread) is checked against the config's diff id: a layer whose diff id does not match fails with
``image_digest_mismatch``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchbox.backends.base import IdMap
from branchbox.errors import (
    BranchboxError,
    ImageDigestMismatchError,
    ImageTooLargeError,
    TemplateBuildError,
    UnsafeImageError,
    UnsupportedImageError,
)
from branchbox.images.importer import resolve_in_root
from branchbox.images.layer_stream import CHUNK, LayerStream
from branchbox.images.oci_layout import Layer
from branchbox.images.shift import shift_id

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CAP_PAX = "SCHILY.xattr.security.capability"
TAR_BUFSIZE = 16 << 10  # tarfile's read size from the stream (it re-slices its buffer on every read: keep it small)
_MAX_META = 1 << 20  # a long name or pax header above 1 MiB is an attack, not a file name
_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


@dataclass
class Budget:
    """What one import may unpack: ``max_bytes`` of file content and ``max_files`` entries, over all layers."""

    max_bytes: int = 16 << 30
    max_files: int = 1_000_000
    bytes: int = 0
    files: int = 0
    cancelled: bool = False  # set from another thread: the unpack stops at the next entry

    def take(self, size: int) -> None:
        if self.cancelled:
            raise TemplateBuildError("the import was cancelled", step="unpack")
        self.files += 1
        self.bytes += size
        if self.files > self.max_files:
            raise ImageTooLargeError(
                f"the image has more than {self.max_files} files: raise the cap (--max-files) if you trust it",
                limit="max_files",
                max_files=self.max_files,
            )
        if self.bytes > self.max_bytes:
            raise ImageTooLargeError(
                f"the image unpacks to more than {self.max_bytes} bytes: raise the cap (--max-size) if you trust it",
                limit="max_bytes",
                max_bytes=self.max_bytes,
            )

    def stream_cap(self) -> int:
        """How many uncompressed bytes a layer may stream (content + tar headers and padding)."""
        return self.max_bytes - self.bytes + 4096 * (self.max_files - self.files) + (1 << 20)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses long-name and pax headers above 1 MiB before tarfile reads them into memory."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        if self.type in _META_TYPES and self.size > _MAX_META:
            raise UnsafeImageError(f"a tar header of {self.size} bytes (over {_MAX_META}): refusing the layer")
        return super()._proc_member(tarfile)  # type: ignore[misc]


def _remove(path: Path | str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _parts(name: str, what: str) -> list[str]:
    if name.startswith("/"):
        raise UnsafeImageError(f"layer entry {name[:200]!r} {what}has an absolute path: refusing the image")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeImageError(f"layer entry {name[:200]!r} {what}contains '..': refusing the image")
    return parts


_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Applier:
    """Applies one layer's entries. Every entry is written by its own few syscalls, never through tarfile's
    extract (which follows a hard-linked symlink when it chowns, chmods and stamps the link: see
    ``_hardlink``): a regular file is created with ``O_EXCL | O_NOFOLLOW`` and its owner, mode, capabilities and
    mtime are set on that descriptor; directories and symlinks are made in a parent resolved inside the root."""

    def __init__(self, root: Path, idmap: IdMap, budget: Budget, layer: Layer) -> None:
        self.root = root
        self.root_s = str(root)
        self.idmap = idmap
        self.budget = budget
        self.layer = layer
        self.created: set[str] = set()
        self.dirs: list[tuple[str, float]] = []
        self.skipped_devices = 0
        self.root_id = shift_id(0, idmap)
        # layer dir -> (its resolved host dir, that dir relative to the root); valid until something is removed
        # (only a removal can turn a directory into a symlink or take it away: see _drop)
        self.parents: dict[str, tuple[str, str]] = {}

    def _drop(self, path: Path | str) -> None:
        self.parents.clear()
        _remove(path)

    def _parent(self, rel_parts: list[str]) -> tuple[str, str]:
        """The host dir for the layer path ``rel_parts`` (symlinks followed inside the root), made if missing,
        and its path relative to the root ('' for the root)."""
        key = "/".join(rel_parts)
        hit = self.parents.get(key)
        if hit is not None:
            return hit
        parent = resolve_in_root(self.root, key)
        rel = parent.relative_to(self.root)
        cur = self.root
        for comp in rel.parts:
            cur = cur / comp
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                os.lchown(cur, self.root_id, self.root_id)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsupportedImageError(
                    f"layer {self.layer.digest}: /{'/'.join(rel_parts)} has a non-directory parent ({cur.name})"
                )
        rel_s = "" if not rel.parts else str(rel)
        hit = self.parents[key] = (str(parent), rel_s)
        return hit

    def _opaque(self, rel_parts: list[str]) -> None:
        d = resolve_in_root(self.root, "/".join(rel_parts))
        if not d.is_dir() or d.is_symlink():
            return
        for dirpath, dirnames, filenames in os.walk(d):
            for name in (*dirnames, *filenames):
                p = os.path.join(dirpath, name)
                if os.path.relpath(p, self.root) not in self.created:
                    self._drop(p)
            dirnames[:] = [n for n in dirnames if os.path.lexists(os.path.join(dirpath, n))]

    def _whiteout(self, rel_parts: list[str], name: str, member: tarfile.TarInfo) -> None:
        if name in ("", ".", ".."):
            raise UnsafeImageError(f"whiteout {member.name[:200]!r} names no file: refusing the image")
        target = resolve_in_root(self.root, "/".join(rel_parts)) / name
        if os.path.lexists(target):
            self._drop(target)

    def _link_target(self, member: tarfile.TarInfo) -> tuple[str, bool]:
        """The host path of a hard link's target (inside the root) and whether that target is a symlink."""
        parts = _parts(member.linkname, f"(hard link of {member.name[:100]!r}) ")
        if not parts:
            raise UnsafeImageError(f"hard link {member.name[:200]!r} points at the root: refusing the image")
        target = resolve_in_root(self.root, "/".join(parts[:-1])) / parts[-1]
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise UnsafeImageError(
                f"hard link {member.name[:200]!r} -> {member.linkname[:200]!r}: no such file in the image"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeImageError(f"hard link {member.name[:200]!r} points at a directory: refusing the image")
        return str(target), stat.S_ISLNK(st.st_mode)

    def apply(self, tar: tarfile.TarFile) -> None:
        idmap = self.idmap
        for member in tar:
            parts = _parts(member.name, "")
            if not parts:
                continue  # the root itself: its owner and mode are the store's
            base, parent_parts = parts[-1], parts[:-1]
            if base.startswith(WHITEOUT):
                if base == OPAQUE:
                    self._opaque(parent_parts)
                elif not base.startswith(WHITEOUT + WHITEOUT):  # .wh..wh.* (aufs internals) mean nothing here
                    self._whiteout(parent_parts, base[len(WHITEOUT) :], member)
                continue
            is_file = member.isreg()
            # tarfile writes the data of a type it does not know as a regular file: it counts like one
            self.budget.take(member.size if is_file or member.type not in tarfile.SUPPORTED_TYPES else 0)
            if member.ischr() or member.isblk():
                self.skipped_devices += 1
                continue
            link = self._link_target(member) if member.islnk() else None
            parent, parent_rel = self._parent(parent_parts)
            dest = f"{parent}/{base}"
            rel = f"{parent_rel}/{base}" if parent_rel else base
            uid, gid = shift_id(member.uid, idmap), shift_id(member.gid, idmap)
            if (is_file and member.issparse()) or not (is_file or member.isdir() or member.issym() or link):
                # fifos, sparse files: tarfile's own code, on a path that is made free first
                with contextlib.suppress(FileNotFoundError):
                    self._drop(dest)
                new = member.replace(name=rel, uid=uid, gid=gid, uname="", gname="", deep=False)
                tar.extract(new, self.root, set_attrs=True, numeric_owner=True, filter="fully_trusted")
            else:
                try:  # most paths are new: one syscall makes the entry, and only a clash looks at what is there
                    self._make(tar, member, dest, link, uid, gid, existing_dir=False)
                except FileExistsError:
                    st = os.lstat(dest)
                    keep = member.isdir() and stat.S_ISDIR(st.st_mode)  # dir over dir: only its attributes change
                    if not keep:
                        self._drop(dest)
                    self._make(tar, member, dest, link, uid, gid, existing_dir=keep)
            self.created.add(rel)
        for path, mtime in reversed(self.dirs):  # entries written into a dir changed its mtime
            with contextlib.suppress(OSError):
                os.utime(path, (mtime, mtime), follow_symlinks=False)

    def _make(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        dest: str,
        link: tuple[str, bool] | None,
        uid: int,
        gid: int,
        *,
        existing_dir: bool,
    ) -> None:
        """Make the entry at ``dest``; FileExistsError (before anything is read or changed) when the path is taken
        (except by a directory when ``existing_dir``)."""
        if member.isreg():
            self._file(tar, member, dest, uid, gid)
        elif member.isdir():
            if not existing_dir:
                os.mkdir(dest, 0o700)
            os.lchown(dest, uid, gid)
            os.chmod(dest, member.mode & 0o7777)
            self.dirs.append((dest, float(member.mtime)))
        elif member.issym():
            os.symlink(member.linkname, dest)
            os.lchown(dest, uid, gid)
        else:
            assert link is not None
            self._hardlink(link, dest, member, uid, gid)

    def _file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, dest: str, uid: int, gid: int) -> None:
        """A regular file: created (never opened through a symlink), filled from the stream, then owner, mode
        (after the owner: chown clears setuid bits), capabilities and mtime on its descriptor."""
        stream = tar.fileobj
        assert stream is not None
        stream.seek(member.offset_data)  # where the stream is already (tarfile only moves forwards)
        fd = os.open(dest, _FILE_FLAGS, 0o600)
        try:
            left = member.size
            while left:
                data = stream.read(min(left, CHUNK))
                if not data:
                    raise tarfile.ReadError(f"unexpected end of data in {member.name[:200]!r}")
                left -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchown(fd, uid, gid)
            os.fchmod(fd, member.mode & 0o7777)
            caps = member.pax_headers.get(_CAP_PAX)
            if caps is not None:
                try:
                    os.setxattr(fd, "security.capability", caps.encode("utf-8", "surrogateescape"))
                except OSError as exc:
                    raise UnsupportedImageError(
                        f"{member.name[:200]!r}: its file capabilities are invalid ({exc})"
                    ) from exc
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _hardlink(self, link: tuple[str, bool], dest: str, member: tarfile.TarInfo, uid: int, gid: int) -> None:
        """A hard link to a file of the root. Its target may be a symlink (a second name of that symlink, as
        Docker makes it): linked without following it, and then only its owner changes, never through it (a
        chown, chmod or utime following ``evil -> /etc/shadow`` would change the host's file)."""
        target, is_symlink = link
        os.link(target, dest, follow_symlinks=False)
        os.lchown(dest, uid, gid)
        if not is_symlink:
            os.chmod(dest, member.mode & 0o7777)  # dest is the regular file (or fifo) just linked, not a symlink
            os.utime(dest, (member.mtime, member.mtime))


def apply_layer(root: Path, blob: Path, layer: Layer, idmap: IdMap, budget: Budget) -> int:
    """Unpack ``blob`` (already checked against ``layer.digest``) onto ``root``; returns skipped device nodes."""
    applier = _Applier(root, idmap, budget, layer)
    try:
        with LayerStream(blob, layer.compression, budget.stream_cap()) as stream:
            with tarfile.open(  # type: ignore[call-overload]
                fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo, bufsize=TAR_BUFSIZE, copybufsize=CHUNK
            ) as tar:
                tar.errorlevel = 2
                applier.apply(tar)
            stream.drain()
            diff_id = stream.sha256()
    except BranchboxError:
        raise
    except (tarfile.TarError, EOFError, UnicodeError) as exc:
        raise UnsupportedImageError(
            f"layer {layer.digest} is not a valid {layer.compression or 'plain'} tar: {exc}", digest=layer.digest
        ) from exc
    except OSError as exc:
        raise TemplateBuildError(f"unpacking layer {layer.digest} failed: {exc}", step="unpack") from exc
    if diff_id != layer.diff_id:
        raise ImageDigestMismatchError(
            f"layer {layer.digest} unpacks to {diff_id}, but the image config says "
            f"{layer.diff_id}: the image is corrupt or was tampered with; nothing was imported",
            digest=layer.digest,
        )
    return applier.skipped_devices
