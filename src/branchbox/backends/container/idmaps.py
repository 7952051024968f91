"""Idmapped layers for per-sandbox uid ranges (issue 22.1), made by the zygote (host root).

A sandbox maps its root to host uid R (its own range); a lower layer whose files are owned in another range P
(the canonical range of templates, or the range of the sandbox a snapshot layer was captured from) is mounted
through an idmapped mount whose user namespace maps P+x to R+x, so the sandbox sees the layer's owners as they
were written (uid x inside) and copy-up writes them to its upper as R+x. The layer on disk is never changed.

An idmapping is a user namespace with that map, unshared by a child process. A fork of the zygote (its preloaded
agent makes it large) cost ~24 ms p50 at load ~12, so the namespaces come from a *maker*: a small process forked by
the zygote before it preloads anything, whose own forks are cheap (``Maker``). The zygote keeps the last
``USERNS_CACHE`` namespaces open (a spare shell's range gets its template mapping when the spare is made, off the
boot path; a fork child's mapping of its parent's layer is new and made at its boot). The mount itself (open_tree,
mount_setattr, move_mount into the shell's mount namespace) costs ~0.3 ms per layer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections import OrderedDict
from pathlib import Path

import branchbox.backends.container.syscalls as syscalls

USERNS_CACHE = 64
LOWERS = "lowers"  # mount points of idmapped layers: shell_dir/lowers/<i>


def make_userns(src: int, dst: int, count: int) -> int:
    """An fd of a new user namespace whose uid and gid maps are ``src dst count`` (made by a short-lived child
    that unshares it; the fd keeps it alive)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(ready_r)
            os.close(hold_w)
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(hold_r, 1)  # EOF once the parent has the namespace
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError(f"idmapping {src}->{dst}: the helper could not unshare a user namespace")
        mapping = f"{src} {dst} {count}\n"
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{pid}/{name}").write_text(mapping)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(hold_w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


class Maker:
    """A small helper process that makes user namespaces on request (``make``) and passes their fds back."""

    def __init__(self, keep: int | None = None) -> None:
        """Fork the maker now (call it while this process is small); ``keep``: an fd the maker keeps open besides
        its socket (none: it closes every other descriptor)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the maker
            code = 1
            try:
                ours.close()
                os.closerange(3, theirs.fileno())
                os.closerange(theirs.fileno() + 1, 65536)
                syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
                _serve_maker(theirs)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.sock = ours
        self.fd = ours.fileno()

    def make(self, src: int, dst: int, count: int) -> int:
        self.sock.send(f"{src} {dst} {count}".encode())
        msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        if not fds:
            raise OSError(f"idmapping {src}->{dst}: {msg.decode(errors='replace') or 'the maker exited'}")
        return fds[0]

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _serve_maker(sock: socket.socket) -> None:  # pragma: no cover - runs in the maker
    while raw := sock.recv(4096):
        try:
            src, dst, count = (int(x) for x in raw.split())
            fd = make_userns(src, dst, count)
        except (OSError, ValueError) as exc:
            sock.send(str(exc).encode() or b"failed")
            continue
        try:
            socket.send_fds(sock, [b"ok"], [fd])
        finally:
            os.close(fd)


class Idmappings:
    """User namespaces mapping one range onto another, kept open (least recently used dropped first)."""

    def __init__(self, count: int, size: int = USERNS_CACHE, maker: Maker | None = None) -> None:
        self.count, self.size = count, size
        self.maker = maker
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()

    def get(self, src: int, dst: int) -> int:
        key = (src, dst)
        fd = self._fds.pop(key, None)
        if fd is None and self.maker is not None:
            try:
                fd = self.maker.make(src, dst, self.count)
            except OSError:  # the maker died: make them here from now on (slower, still correct)
                self.maker = None
        if fd is None:
            fd = make_userns(src, dst, self.count)
        self._fds[key] = fd
        while len(self._fds) > self.size:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.maker is not None:
            self.maker.close()


def mount_points(shell_dir: Path, count: int) -> list[Path]:
    """``count`` empty mount points for idmapped layers (``shell_dir/lowers/<i>``), made in the host's mount
    namespace: the zygote (host root) cannot create files in a shell's own tmpfs (its uid is not mapped there),
    and a mount on one of these directories made inside a shell's namespace is seen by that shell alone."""
    root = shell_dir / LOWERS
    points = [root / str(i) for i in range(count)]
    for p in (root, *points):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o711)
    return points


def mount_layer(path: str, userns_fd: int, target: Path) -> str:
    """Mount layer ``path`` idmapped through ``userns_fd`` on ``target`` (call it in the shell's mount namespace:
    overlayfs takes only layers of the mounter's namespace). Returns the mount point."""
    syscalls.idmapped_mount(path, userns_fd, str(target))
    return str(target)
