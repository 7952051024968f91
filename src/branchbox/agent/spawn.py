"""How the agent starts a child: the oom_score_adj it must not inherit, the posix_spawn fast path's
conditions, the program lookup, the preexec setup (oom score, controlling tty, user ids), users and pty sizes."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import stat
import struct
import termios
from collections.abc import Callable
from typing import Any

from . import users
from .errors import CallError


class OomScore:
    """The agent's own oom_score_adj, which children must not inherit.

    The backend gives the agent a low value. Every child gets "0" before it execs. Cheapest way (keeps the
    vfork fast path of subprocess): raise our own value to 0 around the spawn and restore it right after,
    which is always allowed (the old value is >= our oom_score_adj_min). Children that need a preexec
    function anyway (user, pty), or when the toggle fails, write "0" in the preexec function.
    """

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
            self.value = os.pread(self.fd, 32, 0).strip()
        except OSError:
            self.fd, self.value = -1, b"0"
        self.reset = self.value != b"0"

    def zero(self) -> bool:
        """Set our own value to 0 for the next spawn; False when not possible."""
        try:
            os.pwrite(self.fd, b"0", 0)
        except OSError:
            return False
        return True

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, self.value, 0)


SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # what Python ignores and Popen's restore_signals resets on Linux


@functools.cache
def no_inheritable_fds() -> bool:
    """Make every descriptor above stdio close-on-exec, once per process (later ones are: Python opens them so, and
    SCM_RIGHTS ones are received so); False when they cannot be listed (no /proc).

    A primed shell's warm-up runs it off the boot path, so the Agent of the claim that follows does not."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return False
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed meanwhile
                os.set_inheritable(fd, False)
    return True


def lookup_program(name: str, path: str) -> str | None:
    """The file ``execvpe`` would run for ``name``: the first regular file with an execute bit on ``path``."""
    if "/" in name:
        return name
    for d in path.split(os.pathsep):
        candidate = f"{d or '.'}/{name}"
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return candidate
    return None


def child_setup(reset_oom: bool, ctty: bool, ids: tuple[int, int, list[int]] | None) -> Callable[[], None] | None:
    """The preexec function run in the child before exec (None when nothing needs doing)."""
    if not (reset_oom or ctty or ids):
        return None

    def setup() -> None:
        if reset_oom:
            try:
                fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            except OSError:
                pass
        if ctty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if ids is not None:
            uid, gid, groups = ids
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)

    return setup


def resolve_user(user: Any) -> tuple[int, int, list[int], str, str]:
    """(uid, gid, groups, name, home) for a user name or uid, from the sandbox's /etc/passwd and /etc/group as
    parsed by the agent itself (:mod:`users`): never through NSS, which would load the sandbox's libnss_*.so."""
    if isinstance(user, bool) or not (isinstance(user, int) or (isinstance(user, str) and user)):
        raise CallError("bad_request", "user must be a user name or a uid")
    try:
        u = users.lookup(user)
    except users.UserError as exc:
        raise CallError("bad_request", str(exc)) from None
    return u.uid, u.gid, u.groups, u.name, u.home


def winsize(cols: int, rows: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)
