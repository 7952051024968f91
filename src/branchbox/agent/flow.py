"""Flow-controlled calls: the host's DATA consumed within the credit granted (:class:`Receiver`), a process's
output streamed within the host's credit (:class:`Sink`), chunks of a file or archive sent the same way
(:class:`ChunkSender`), files and tar streams written as they arrive."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from . import archive, users, wire
from .errors import CallError, os_error
from .protocol import Connection, Handler
from .supervise import Proc
from .watch import note_replace

ACK_EVERY = wire.INITIAL_WINDOW // 4  # return credit to the host once this much of its DATA was consumed


class Receiver(Handler):
    """A call that consumes the host's DATA: returns credit every ``ACK_EVERY`` bytes, while the call lasts."""

    consumed = 0

    def ack(self, n: int) -> None:
        self.consumed += n
        if self.consumed >= ACK_EVERY and self.conn.calls.get(self.channel) is self:
            self.window += self.consumed
            self.conn.send(wire.encode_window(self.channel, self.consumed))
            self.consumed = 0


class Sink(Receiver):
    """Streams a process's output to one call (an exec or an attach) within the host's credit."""

    def __init__(self, conn: Connection, channel: int, proc: Proc, *, owner: bool) -> None:
        super().__init__(conn, channel)
        self.proc = proc
        self.owner = owner  # the exec call that started a foreground process
        self.credit = wire.INITIAL_WINDOW
        self.pending: deque[tuple[int, bytes]] = deque()
        proc.sinks.append(self)

    def push(self, stream: int, data: bytes) -> bool:
        """Send what the credit allows, queue the rest; False when something is left queued."""
        if self.pending or self.credit <= 0:
            self.pending.append((stream, data))
            return False
        if len(data) > self.credit:
            self.pending.append((stream, data[self.credit :]))
            data = data[: self.credit]
        self.credit -= len(data)
        self.conn.send(wire.encode_data(self.channel, stream, data))
        return not self.pending

    def flush(self) -> None:
        pending = self.pending
        while pending and self.credit > 0:
            stream, data = pending.popleft()
            if len(data) > self.credit:
                pending.appendleft((stream, data[self.credit :]))
                data = data[: self.credit]
            self.credit -= len(data)
            self.conn.send(wire.encode_data(self.channel, stream, data))
        if pending:
            return
        proc = self.proc
        if proc.finished:
            self.finish()
        else:
            proc.maybe_resume()

    def finish(self) -> None:
        proc = self.proc
        if self in proc.sinks:
            proc.sinks.remove(self)
        if self.owner and not proc.background and proc.timed_out:
            self.end(
                {
                    "error": {
                        "code": "timeout",
                        "message": f"command timed out after {proc.timeout} s: pass a larger timeout",
                        "details": {
                            "timeout": proc.timeout,
                            "stdout_bytes": proc.out_bytes[1],
                            "stderr_bytes": proc.out_bytes[2],
                            "pid": proc.pid,
                        },
                    }
                }
            )
        else:
            self.end(proc.result())

    def detach(self, body: dict[str, Any] | None) -> None:
        if self in self.proc.sinks:
            self.proc.sinks.remove(self)
        self.pending.clear()
        self.proc.maybe_resume()
        if body is not None:
            self.end(body)

    def on_window(self, credit: int) -> None:
        self.credit += credit
        self.flush()

    def on_data(self, stream: int, data: bytes) -> None:
        self.proc.write_stdin(data, self)

    def on_eof(self, stream: int) -> None:
        self.proc.request_stdin_eof()

    def on_cancel(self) -> None:
        if self.owner and not self.proc.background:
            self.proc.kill(signal.SIGKILL)  # the RESULT follows at exit
        else:
            self.detach({"detached": True, "pid": self.proc.pid})

    def on_lost(self) -> None:
        if self.owner:
            self.proc.orphaned = True
            if self.proc.finished:
                self.agent_keep()
        self.detach(None)

    def agent_keep(self) -> None:
        """A foreground process finished while its result could not be delivered: list it as exited."""
        agent = self.proc.agent
        if self.proc.pid not in agent.procs:
            agent.procs[self.proc.pid] = self.proc
            agent.exited.append(self.proc.pid)


class ChunkSender(Handler):
    """files.read, files.archive: an iterator's chunks as DATA on stream 1 within the host's credit, then RESULT
    {"size"}. ``cleanup`` (once) releases what the iterator holds, at the end or on a cancel."""

    def __init__(self, conn: Connection, channel: int, chunks: Iterator[bytes], cleanup: Callable[[], None]) -> None:
        super().__init__(conn, channel)
        self.chunks = chunks
        self.cleanup: Callable[[], None] | None = cleanup
        self.credit = wire.INITIAL_WINDOW
        self.size = 0
        self.rest = b""

    def pump(self) -> None:
        while self.credit > 0:
            data = self.rest
            if not data:
                try:
                    data = next(self.chunks, b"")
                except OSError as exc:
                    self.close()
                    self.end({"error": os_error(exc).to_dict()})
                    return
                if not data:
                    self.close()
                    self.end({"size": self.size})
                    return
            data, self.rest = data[: self.credit], data[self.credit :]
            self.size += len(data)
            self.credit -= len(data)
            self.conn.send(wire.encode_data(self.channel, wire.STDOUT, data))

    def close(self) -> None:
        cleanup, self.cleanup = self.cleanup, None
        if cleanup is not None:
            cleanup()

    def on_window(self, credit: int) -> None:
        self.credit += credit
        self.pump()

    def on_cancel(self) -> None:
        self.close()
        super().on_cancel()

    def on_lost(self) -> None:
        self.close()


def fd_chunks(fd: int, limit: int | None = None) -> Iterator[bytes]:
    """A file's bytes; more than ``limit`` (a file growing while it is read) fails the read with EFBIG."""
    size = 0
    while data := os.read(fd, wire.CHUNK_SIZE):
        size += len(data)
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"the file grew past {limit} bytes while it was read")
        yield data


def _makedirs(path: str, owner: tuple[int, int] | None) -> None:
    """``os.makedirs(path, exist_ok=True)``; with ``owner`` the directories it creates are given to that uid/gid."""
    if owner is None or os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        return
    missing = []
    head = path
    while head not in ("", "/") and not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
            os.chown(d, *owner)
    if not os.path.isdir(path):
        raise FileExistsError(errno.EEXIST, "File exists", path)


class FileWriter(Receiver):
    """files.write: DATA to a temp file next to the target; EOF -> fsync, chmod, rename."""

    def __init__(
        self,
        conn: Connection,
        channel: int,
        path: str,
        mode: int | None,
        owner: tuple[int, int] | None = None,
        xattrs: dict[str, str] | None = None,
    ) -> None:
        parent = os.path.dirname(path) or "/"
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                raise CallError("is_a_directory", f"Is a directory: {path}")
            try:
                _makedirs(parent, owner)
            except FileExistsError:
                raise CallError("not_a_directory", f"Not a directory: {parent}") from None
            self.tmp = f"{parent.rstrip('/')}/.{os.path.basename(path)}.bbtmp-{os.urandom(6).hex()}"
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise os_error(exc, path) from exc
        super().__init__(conn, channel)
        self.path = path
        self.mode = mode
        self.owner = owner
        self.xattrs = xattrs or {}

    def on_data(self, stream: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.abort()
            self.end({"error": os_error(exc, self.path).to_dict()})
            return
        self.ack(len(data))

    def on_eof(self, stream: int) -> None:
        try:
            try:
                old = os.stat(self.path)
            except FileNotFoundError:
                old = None
            mode = self.mode
            if mode is None:
                mode = stat.S_IMODE(old.st_mode) if old is not None else 0o644
            if old is not None:
                with contextlib.suppress(OSError):
                    os.fchown(self.fd, old.st_uid, old.st_gid)
            elif self.owner is not None:  # a new file is its owner's before it appears (no chown event after)
                os.fchown(self.fd, *self.owner)
            if old is not None:  # a file written in place keeps its extended attributes: so does this one
                for name, value in read_xattrs(self.path, XATTR_NAMESPACE).items():
                    with contextlib.suppress(OSError):
                        os.setxattr(self.fd, name, value.encode())
            for name, value in self.xattrs.items():
                os.setxattr(self.fd, name, value.encode())
            os.fchmod(self.fd, mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.conn.agent.watches:  # a watch reports this rename as the file's create or write
                note_replace(self.conn.agent.replacing, self.tmp, old is not None)
            os.rename(self.tmp, self.path)
            body: dict[str, Any] = entry(self.path, os.path.basename(self.path))
        except OSError as exc:
            self.abort()
            body = {"error": os_error(exc, self.path).to_dict()}
        self.end(body)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)

    def on_cancel(self) -> None:
        self.abort()
        super().on_cancel()

    def on_lost(self) -> None:
        self.abort()


class ArchiveWriter(Receiver):
    """files.extract: a tar stream unpacked into a directory as it arrives; EOF -> RESULT with the counts."""

    def __init__(self, conn: Connection, channel: int, dest: str) -> None:
        try:
            self.extractor = archive.Extractor(dest)
        except archive.ArchiveError as exc:
            raise CallError(exc.code, exc.message) from None
        except OSError as exc:
            raise os_error(exc, dest) from exc
        super().__init__(conn, channel)

    def on_data(self, stream: int, data: bytes) -> None:
        self.step(self.extractor.feed, data)
        self.ack(len(data))  # nothing once a failure ended the call

    def on_eof(self, stream: int) -> None:
        result = self.step(self.extractor.finish)
        if result is not None:
            self.end(result)

    def step(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; a failure ends the call with its error (unpacking stops there)."""
        try:
            return fn(*args)
        except (archive.ArchiveError, OSError) as exc:
            self.extractor.abort()
            err = CallError(exc.code, exc.message) if isinstance(exc, archive.ArchiveError) else os_error(exc)
            self.end({"error": err.to_dict()})
            return None

    def on_cancel(self) -> None:
        self.extractor.abort()
        super().on_cancel()

    def on_lost(self) -> None:
        self.extractor.abort()


XATTR_NAMESPACE = "user."  # the only extended attributes the file calls read or write


def read_xattrs(path: str, prefix: str) -> dict[str, str]:
    """The entry's extended attributes whose names start with ``prefix`` (not following a symlink); none where the
    filesystem keeps none."""
    out: dict[str, str] = {}
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            if name.startswith(prefix):
                out[name] = os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "replace")
    except OSError:
        return out
    return out


def check_xattr_prefix(prefix: Any) -> str | None:
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not prefix.startswith(XATTR_NAMESPACE):
        raise CallError("bad_request", f"xattrs must be a name prefix in the {XATTR_NAMESPACE} namespace")
    return prefix


def entry(path: str, name: str, st: os.stat_result | None = None, xattrs: str | None = None) -> dict[str, Any]:
    """A FileEntry as a dict (lstat: symlinks are reported as symlinks); with ``xattrs`` (a name prefix) the
    extended attributes of those names."""
    if st is None:
        st = os.lstat(path)
    mode = st.st_mode
    target = None
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
        with contextlib.suppress(OSError):
            target = os.readlink(path)
    else:
        kind = "other"
    owner, group = users.owner_names(st.st_uid, st.st_gid)
    return {
        "path": path,
        "name": name,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
        "symlink_target": target,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "owner": owner,
        "group": group,
        **({"xattrs": read_xattrs(path, xattrs)} if xattrs is not None else {}),
    }
