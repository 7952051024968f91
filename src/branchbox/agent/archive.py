"""Tar streams of sandbox paths, made and unpacked a chunk at a time inside the agent (stdlib only).

:func:`tar_chunks` packs a directory's contents (names relative to it, as ``tar -C DIR -c .`` without the
``./``) or one file under its own name. :class:`Extractor` unpacks a tar stream into a directory as its chunks
arrive: ustar, pax (``x``/``g``) and GNU long names (``L``/``K``); regular files, directories, symlinks, hard
links and fifos. Neither holds more than about one chunk in memory, so both run on the agent's event loop under
the protocol's flow control. Owners are not kept: what is unpacked belongs to the agent's user (root), as with
``docker cp``. Permission bits and modification times are kept.

``tarfile`` is imported on first use (a few ms: kept off the agent's start); the container zygote preloads it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tarfile

BLOCK = 512
_META = (b"x", b"g", b"X", b"L", b"K")  # pax (per member, global, Solaris) and GNU long name / long link
_FILE = (b"0", b"\0", b"7")  # regular, old regular, contiguous
_COMPRESSED = (  # magic numbers at the start (bzip2's with its first block's, so a name "BZh..." is no match)
    (re.compile(rb"\x1f\x8b"), "gzip"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
)


class ArchiveError(Exception):
    """A stream that is not a tar this can unpack; ``code`` is the agent's error code."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _tarfile() -> Any:
    import tarfile  # noqa: PLC0415 - see the module doc

    return tarfile


def _pad(size: int) -> int:
    return -size % BLOCK


# ------------------------------------------------------------------------------------------------------ pack
def tar_chunks(root: str, chunk: int) -> Generator[bytes, None, None]:
    """The pax archive of ``root`` in chunks of exactly ``chunk`` bytes (the last one shorter). Raises OSError
    at once when ``root`` cannot be read; entries that vanish or cannot be opened later are left out, and so are
    sockets and devices. Symlinks are archived as links, never followed."""
    st = os.lstat(root)
    if stat.S_ISDIR(st.st_mode):
        os.close(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))  # unreadable: fail before any byte
        pieces = _tree(root, "")
    else:
        pieces = _member(root, os.path.basename(root.rstrip("/")) or "file", st)
    return _rechunk(pieces, chunk)


def _rechunk(pieces: Iterator[bytes], chunk: int) -> Generator[bytes, None, None]:
    out = bytearray()
    for piece in pieces:
        out += piece
        while len(out) >= chunk:
            yield bytes(out[:chunk])
            del out[:chunk]
    out += bytes(2 * BLOCK)  # end of archive
    while out:
        yield bytes(out[:chunk])
        del out[:chunk]


def _tree(directory: str, prefix: str) -> Iterator[bytes]:
    try:
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for item in items:
        name = prefix + item.name
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        yield from _member(item.path, name, st)
        if stat.S_ISDIR(st.st_mode):
            yield from _tree(item.path, name + "/")


def _header(name: str, st: os.stat_result, kind: bytes, *, size: int = 0, link: str = "") -> bytes:
    tf = _tarfile()
    info = tf.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.linkname = link
    data: bytes = info.tobuf(tf.PAX_FORMAT, "utf-8", "surrogateescape")
    return data


def _member(path: str, name: str, st: os.stat_result) -> Iterator[bytes]:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        yield _header(name, st, b"5")
    elif stat.S_ISLNK(mode):
        try:
            link = os.readlink(path)
        except OSError:
            return
        yield _header(name, st, b"2", link=link)
    elif stat.S_ISFIFO(mode):
        yield _header(name, st, b"6")
    elif stat.S_ISREG(mode):
        yield from _file(path, name)


def _file(path: str, name: str) -> Iterator[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        size = st.st_size
        yield _header(name, st, b"0", size=size)
        left = size
        while left:
            data = os.read(fd, min(left, 256 * 1024))
            if not data:  # the file shrank while it was read: its header already promised ``size`` bytes
                yield bytes(left)
                break
            left -= len(data)
            yield data
        yield bytes(_pad(size))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- unpack
class Extractor:
    """Unpacks a tar stream into ``dest`` (created with its parents) as it is fed.

    Call :meth:`feed` with each chunk, then :meth:`finish`; :meth:`abort` after a failure. Member names may not
    climb out of ``dest`` (absolute names are taken as relative to it). Existing files are replaced, existing
    directories merged into. Not atomic: members before a bad one stay unpacked (the error says which one)."""

    def __init__(self, dest: str) -> None:
        if os.path.lexists(dest) and not os.path.isdir(dest):
            raise ArchiveError(f"Not a directory: {dest}", "not_a_directory")
        os.makedirs(dest, exist_ok=True)
        self.dest = dest.rstrip("/") or "/"
        self.buf = bytearray()
        self.left = 0  # bytes of the current member's data still to come, then ``pad`` bytes of padding
        self.pad = 0
        self.fd = -1  # the regular file being written
        self.info: tarfile.TarInfo | None = None  # the member whose data is coming
        self.meta = bytearray()  # the data of a pax or GNU long-name member
        self.pax: dict[str, str] = {}  # applies to the next member
        self.global_pax: dict[str, str] = {}
        self.ended = False
        self.started = False
        self.made: set[str] = {self.dest}  # directories known to exist
        self.dirs: list[tuple[str, int, float]] = []  # modes and times are set last (writing into them moves mtime)
        self.files = 0
        self.directories = 0
        self.links = 0
        self.bytes = 0

    # -- the stream
    def feed(self, data: bytes) -> None:
        if data and not self.started:
            self.started = True
            for magic, kind in _COMPRESSED:
                if magic.match(data):
                    raise ArchiveError(f"the archive is {kind}-compressed: send an uncompressed tar")
        if self.buf:  # a header split across chunks
            data = bytes(self.buf) + data
            self.buf.clear()
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self.left or self.pad:
                pos = self._take(view, pos)
            elif end - pos < BLOCK:
                self.buf += view[pos:]
                return
            else:
                block = bytes(view[pos : pos + BLOCK])
                pos += BLOCK
                if not self.ended:
                    self._header(block)

    def finish(self) -> dict[str, Any]:
        """Check the stream ended on a member boundary, set the directories' modes and times; the counts."""
        if not self.started:
            raise ArchiveError("the archive is empty: send a tar stream (e.g. tar -c -C DIR .)")
        if self.left or self.pad or (self.buf and not self.ended):
            name = self.info.name if self.info is not None else "a header"
            self.abort()
            raise ArchiveError(f"the archive ends inside {name!r}: it is truncated")
        for path, mode, mtime in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.chmod(path, mode)
                os.utime(path, (mtime, mtime))
        return {
            "path": self.dest,
            "files": self.files,
            "dirs": self.directories,
            "links": self.links,
            "bytes": self.bytes,
        }

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- members
    def _header(self, block: bytes) -> None:
        if block == bytes(BLOCK):
            self.ended = True  # end of archive: whatever follows (the second zero block, padding) is ignored
            return
        tf = _tarfile()
        try:
            info = tf.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tf.HeaderError as exc:
            where = "" if self.files + self.directories + self.links else " (is it an uncompressed tar?)"
            raise ArchiveError(f"not a tar header{where}: {exc}") from None
        kind = info.type
        if kind in _META:
            self.info = info
            self.meta.clear()
            self._expect(info.size)
            return
        self._apply_meta(info)
        self.info = info
        path = self._target(info.name)
        if kind in _FILE:
            self._replace(path)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self._expect(info.size)
            if not info.size:
                self._file_done()
            return
        if kind == b"5":
            if path != self.dest:
                if os.path.lexists(path) and not os.path.isdir(path):
                    os.unlink(path)
                os.makedirs(path, 0o700, exist_ok=True)
                self.made.add(path)
                self.directories += 1
            self.dirs.append((path, info.mode & 0o7777, info.mtime))
        elif kind == b"2":
            self._replace(path)
            os.symlink(info.linkname, path)
            self.links += 1
        elif kind == b"1":
            source = self._target(info.linkname)
            self._replace(path)
            try:
                os.link(source, path, follow_symlinks=False)
            except FileNotFoundError:
                raise ArchiveError(f"hard link {info.name!r} names {info.linkname!r}, not in the archive") from None
            self.links += 1
        elif kind == b"6":
            self._replace(path)
            os.mkfifo(path, info.mode & 0o777)
        elif kind == b"S":
            raise ArchiveError(f"{info.name!r} is a GNU sparse file: pack it without --sparse")
        self._expect(info.size)  # devices are skipped (no CAP_MKNOD), with any data they carry

    def _take(self, view: memoryview, pos: int) -> int:
        """Consume the current member's data, then its padding, from ``view[pos:]``; the new position."""
        if self.left:
            n = min(self.left, len(view) - pos)
            piece = view[pos : pos + n]
            pos += n
            self.left -= n
            if self.fd >= 0:
                while piece:
                    piece = piece[os.write(self.fd, piece) :]
                self.bytes += n
            elif self.info is not None and self.info.type in _META:
                self.meta += piece
            if self.left:
                return pos
            if self.fd >= 0:
                self._file_done()
            elif self.info is not None and self.info.type in _META:
                self._meta_done(self.info.type)
        n = min(self.pad, len(view) - pos)
        self.pad -= n
        return pos + n

    def _expect(self, size: int) -> None:
        self.left = size
        self.pad = _pad(size)

    def _file_done(self) -> None:
        info = self.info
        assert info is not None
        os.fchmod(self.fd, info.mode & 0o7777)
        with contextlib.suppress(OSError):
            os.utime(self.fd, (info.mtime, info.mtime))  # on the open file: no second walk of its path
        os.close(self.fd)
        self.fd = -1
        self.files += 1

    def _meta_done(self, kind: bytes) -> None:
        data = bytes(self.meta)
        self.meta.clear()
        if kind in (b"L", b"K"):
            self.pax["path" if kind == b"L" else "linkpath"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        else:
            (self.global_pax if kind == b"g" else self.pax).update(_pax_records(data))

    def _apply_meta(self, info: tarfile.TarInfo) -> None:
        pax = {**self.global_pax, **self.pax}
        self.pax = {}
        if "path" in pax:
            info.name = pax["path"].rstrip("/") if info.type == b"5" else pax["path"]
        if "linkpath" in pax:
            info.linkname = pax["linkpath"]
        try:
            if "size" in pax:
                info.size = int(pax["size"])
            if "mtime" in pax:
                info.mtime = float(pax["mtime"])
        except ValueError:
            raise ArchiveError(f"bad pax size or mtime for {info.name!r}") from None

    def _target(self, name: str) -> str:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ArchiveError(f"archive member {name!r} climbs out of the target directory")
        return "/".join([self.dest.rstrip("/"), *parts]) if parts else self.dest

    def _parents(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in self.made:
            os.makedirs(parent, exist_ok=True)
            self.made.add(parent)

    def _replace(self, path: str) -> None:
        """Make way for a new member at ``path``: parents created, a file or link there removed."""
        if path == self.dest:
            raise ArchiveError("an archive member that is not a directory names the target directory itself")
        self._parents(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise ArchiveError(f"{path} is a directory: the archive has a file there", "is_a_directory")
            os.unlink(path)


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records (POSIX pax extended header)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError("bad pax extended header") from None
        if space < 0 or length <= space - pos:
            raise ArchiveError("bad pax extended header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out
