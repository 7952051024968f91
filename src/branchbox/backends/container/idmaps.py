"""Idmapped layers for per-sandbox uid ranges (issue 22.1), made by the zygote (host root).

A sandbox maps its root to host uid R (its own range); a lower layer whose files are owned in another range P
(the canonical range of templates, or the range of the sandbox a snapshot layer was captured from) is mounted
through an idmapped mount whose user namespace maps P+x to R+x, so the sandbox sees the layer's owners as they
were written (uid x inside) and copy-up writes them to its upper as R+x. The layer on disk is never changed.

An idmapping is a user namespace with that map. Making one costs a fork (~3-7 ms here); the zygote keeps the last
``USERNS_CACHE`` of them open (a pair is used again by every boot in the same range: a spare shell's range gets
its template mapping when the spare is made, off the boot path). The mount itself (open_tree, mount_setattr,
move_mount into the shell's mount namespace) costs ~0.3 ms per layer.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path

from branchbox.backends.container import syscalls

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


class Idmappings:
    """User namespaces mapping one range onto another, kept open (least recently used dropped first)."""

    def __init__(self, count: int, size: int = USERNS_CACHE) -> None:
        self.count, self.size = count, size
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()

    def get(self, src: int, dst: int) -> int:
        key = (src, dst)
        fd = self._fds.pop(key, None)
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
