"""``files.watch``: a directory's changes by inotify (libc through ctypes), streamed to the host as JSON lines on
DATA within the host's credit. docs/agent-protocol.md.

Bounded however the sandbox behaves: at most :data:`MAX_WATCHES` inotify watches (directories) and
:data:`MAX_STREAMS` watch calls per agent; at most :data:`MAX_PENDING` events queued while the host's credit is
spent, after which the agent stops reading the inotify descriptor and the kernel's own bounded queue takes over
(``fs.inotify.max_queued_events``; past it the kernel reports ``IN_Q_OVERFLOW``, sent on as an ``overflow``
line). Symlinks below the watched directory are never followed (no loop can be walked into), and closing the call
(CANCEL, a lost connection) closes the descriptor, which removes every watch.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections import deque
from typing import Any

from . import wire
from .errors import CallError, os_error
from .protocol import Connection, Handler

try:  # imported up front: a container's agent runs with an empty sys.path (nothing loads later)
    import ctypes
except ImportError:  # pragma: no cover - a python built without ctypes: files.watch answers not_supported
    ctypes = None  # type: ignore[assignment]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
MASK = (IN_CREATE | IN_MODIFY | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF
        | IN_ONLYDIR | IN_EXCL_UNLINK)  # fmt: skip
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)

MAX_WATCHES = 8192  # inotify watches (directories) per agent, over all its watch calls
MAX_STREAMS = 32  # watch calls open at once per agent
MAX_PENDING = 4096  # events queued while the host's credit is spent; beyond it reading pauses
READ_SIZE = 64 * 1024
TEMP_MARK = ".bbtmp-"  # files.write's temporary files (``.NAME.bbtmp-HEX``): their steps are not reported


class _Libc:
    def __init__(self) -> None:
        if ctypes is None:
            raise CallError("not_supported", "this sandbox's python3 has no ctypes: files.watch needs it for inotify")
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own libc: no file is opened
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.add = libc.inotify_add_watch
        self.add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm = libc.inotify_rm_watch
        self.rm.argtypes = [ctypes.c_int, ctypes.c_int]

    @staticmethod
    def check(ret: int, path: str | None = None) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return ret


@functools.cache
def _lib() -> _Libc:
    return _Libc()


def _limit(what: str) -> CallError:
    return CallError(
        "limit_exceeded",
        f"{what}: a sandbox has at most {MAX_WATCHES} watched directories and {MAX_STREAMS} watches; "
        "stop a watch or watch a smaller tree (recursive=false)",
        max_watches=MAX_WATCHES,
        max_streams=MAX_STREAMS,
    )


class Watch(Handler):
    """One ``files.watch`` call: an inotify descriptor, its watches (descriptor -> path relative to the root) and
    the events not yet sent."""

    def __init__(self, conn: Connection, channel: int, root: str, recursive: bool) -> None:
        lib = _lib()
        agent = conn.agent
        watches: list[Watch] = agent.watches
        if len(watches) >= MAX_STREAMS:
            raise _limit(f"{MAX_STREAMS} watches are open")
        try:
            fd = lib.check(lib.init1(os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _limit(f"the kernel refused another inotify instance ({exc.strerror})") from None
            raise os_error(exc) from exc
        self.lib, self.fd, self.root, self.recursive = lib, fd, root, recursive
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory relative to the root ("" for the root)
        self.pending: deque[bytes] = deque()  # JSON lines not sent yet
        self.credit = wire.INITIAL_WINDOW
        self.moves: dict[int, str] = {}  # cookie -> temp name of files.write's rename in flight
        self.reading = False
        self.ending: dict[str, Any] | None = None  # the RESULT to send once everything pending is sent
        self.all = watches
        try:
            try:
                self.add("", follow=True)
            except OSError as exc:
                raise os_error(exc, root) from exc
            if recursive and not self.walk("", report=False):
                raise _limit(f"{root} has more directories than are left to watch")  # noqa: TRY301
        except BaseException:
            self.close()
            raise
        super().__init__(conn, channel)
        watches.append(self)
        conn.send(wire.encode_json(wire.EVENT, channel, {"event": "started", "watches": len(self.dirs)}))
        self.resume()

    # -- watches -------------------------------------------------------------------------------------
    def total(self) -> int:
        return sum(len(w.dirs) for w in self.all) + (0 if self in self.all else len(self.dirs))

    def add(self, rel: str, *, follow: bool = False) -> bool:
        """Watch the directory ``rel``; False when the per-agent limit is reached (OSError for the root)."""
        if self.total() >= MAX_WATCHES:
            if not rel:
                raise _limit("no watch is left")
            return False
        path = f"{self.root.rstrip('/')}/{rel}" if rel else self.root
        mask = MASK if follow else MASK | IN_DONT_FOLLOW
        try:
            wd = self.lib.check(self.lib.add(self.fd, os.fsencode(path), mask), path)
        except OSError as exc:
            if not rel:
                if exc.errno == errno.ENOSPC:
                    raise _limit(f"the kernel refused another inotify watch ({exc.strerror})") from None
                raise
            # ENOSPC: the kernel's limit; else gone again, not a directory any more, not ours to read: nothing to do
            return exc.errno != errno.ENOSPC
        self.dirs[wd] = rel
        return True

    def walk(self, rel: str, *, report: bool) -> bool:
        """Watch every directory below ``rel`` (symlinks not followed); with ``report``, each entry found is a
        ``create`` (a new directory filled before its watch was added: ``mkdir -p``, an unpacked tar). False when
        the watch limit stopped it."""
        stack = [rel]
        while stack:
            top = stack.pop()
            base = f"{self.root.rstrip('/')}/{top}" if top else self.root
            try:
                with os.scandir(base) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            for item in items:
                name = f"{top}/{item.name}" if top else item.name
                try:
                    is_dir = item.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if report:
                    self.queue("create", name, is_dir)
                if is_dir:
                    if not self.add(name):
                        return False
                    stack.append(name)
        return True

    def forget(self, rel: str) -> None:
        """Stop watching ``rel`` and below (moved out of the tree, or away to be watched again at its new name)."""
        prefix = rel + "/"
        for wd, d in list(self.dirs.items()):
            if d == rel or d.startswith(prefix):
                del self.dirs[wd]
                self.lib.rm(self.fd, wd)

    # -- events --------------------------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish({"error": os_error(exc).to_dict()})
            return
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, cookie, size = _EVENT.unpack_from(data, pos)
            raw = data[pos + _EVENT.size : pos + _EVENT.size + size].rstrip(b"\0")
            pos += _EVENT.size + size
            self.event(wd, mask, cookie, os.fsdecode(raw))
            if self.ending is not None:
                break
        self.flush()

    def event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.overflow("queue")
            return
        rel = self.dirs.get(wd)
        if rel is None:
            return  # a watch removed a moment ago
        if mask & (IN_IGNORED | IN_DELETE_SELF | IN_UNMOUNT):
            if mask & IN_IGNORED:
                del self.dirs[wd]
            if not rel and self.ending is None:  # the watched directory itself is gone: the call ends
                self.ending = {"ended": "removed" if not mask & IN_UNMOUNT else "unmounted", "path": self.root}
            return
        is_dir = bool(mask & IN_ISDIR)
        full = f"{rel}/{name}" if rel else name
        if TEMP_MARK in name:
            if mask & IN_MOVED_FROM and name.startswith(".") and not is_dir:
                self.moves[cookie] = os.path.join(self.root, full)
                while len(self.moves) > 64:
                    del self.moves[next(iter(self.moves))]
            return  # files.write's own steps: only the rename into place is reported
        if mask & IN_MOVED_TO and (tmp := self.moves.pop(cookie, None)) is not None:
            if not self.conn.agent.replacing.get(tmp, False):
                self.queue("create", full, False)
            self.queue("write", full, False)
            return
        if mask & (IN_CREATE | IN_MOVED_TO):
            self.queue("create", full, is_dir)
            if is_dir and self.recursive:
                if mask & IN_MOVED_TO:
                    self.forget(full)
                if not (self.add(full) and self.walk(full, report=True)):
                    self.overflow("watch_limit")
        if mask & IN_MOVED_FROM:
            self.queue("rename", full, is_dir)
            if is_dir:
                self.forget(full)
        if mask & IN_ATTRIB:
            self.queue("chmod", full, is_dir)
        if mask & IN_MODIFY:
            self.queue("write", full, is_dir)
        if mask & IN_DELETE:
            self.queue("remove", full, is_dir)

    def queue(self, kind: str, name: str, is_dir: bool) -> None:
        event: dict[str, Any] = {"type": kind, "name": name, "dir": True} if is_dir else {"type": kind, "name": name}
        line = wire.dumps(event) + b"\n"
        if not self.pending or self.pending[-1] != line:  # the same event again (a file written in pieces): one
            self.pending.append(line)

    def overflow(self, reason: str) -> None:
        """Events were lost (the kernel's queue overflowed, or a new directory found no watch left)."""
        line = wire.dumps({"type": "overflow", "reason": reason}) + b"\n"
        if not self.pending or self.pending[-1] != line:
            self.pending.append(line)

    # -- flow ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send whole lines within the credit; pause reading while too much is pending."""
        pending = self.pending
        while pending and self.credit >= len(pending[0]):
            batch: list[bytes] = []
            size = 0
            while pending and size + len(pending[0]) <= min(self.credit, wire.CHUNK_SIZE):
                line = pending.popleft()
                batch.append(line)
                size += len(line)
            self.credit -= size
            self.conn.send(wire.encode_data(self.channel, wire.STDOUT, b"".join(batch)))
        if self.ending is not None:
            self.pause()
            if not pending:
                self.finish(self.ending)
            return
        if len(pending) >= MAX_PENDING:
            self.pause()
        elif len(pending) < MAX_PENDING // 2:
            self.resume()

    def pause(self) -> None:
        if self.reading:
            self.reading = False
            self.conn.agent.loop.remove_reader(self.fd)

    def resume(self) -> None:
        if not self.reading and self.fd >= 0:
            self.reading = True
            self.conn.agent.loop.add_reader(self.fd, self.on_readable)

    def on_window(self, credit: int) -> None:
        self.credit += credit
        self.flush()

    # -- end -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the descriptor (the kernel removes every watch of it) and forget what is pending."""
        self.pause()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.dirs.clear()
        self.pending.clear()
        if self in self.all:
            self.all.remove(self)

    def finish(self, body: dict[str, Any]) -> None:
        self.close()
        self.end(body)

    def on_cancel(self) -> None:
        self.finish({"ended": "cancelled", "path": self.root})

    def on_lost(self) -> None:
        self.close()


def note_replace(notes: dict[str, bool], tmp: str, replaced: bool) -> None:
    """files.write is about to rename ``tmp`` into place: note whether that replaces a file, so that the open
    watches report a write (else a create and a write, as a file written in place shows)."""
    notes[tmp] = replaced
    while len(notes) > 256:
        del notes[next(iter(notes))]


def m_files_watch(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    """``{"path", "recursive"?}``: an EVENT ``started`` once the watches are in place, then JSON lines on DATA
    (``{"type": create|write|remove|rename|chmod, "name": path relative to the watched directory, "dir"?: true}``,
    ``{"type": "overflow", "reason"}`` when events were lost), until CANCEL or the directory is removed
    (RESULT ``{"ended": "removed"|"unmounted"|"cancelled"}``)."""
    path = conn.agent.path(params.get("path"))
    try:
        if not os.path.isdir(path):
            os.stat(path)  # the error of a missing path
            raise CallError("not_a_directory", f"Not a directory: {path}")
    except OSError as exc:
        raise os_error(exc, path) from exc
    Watch(conn, channel, path, bool(params.get("recursive")))
