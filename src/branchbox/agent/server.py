"""The in-sandbox agent: serves exec, processes, pty and files over the framed protocol in ``wire``.

Runs as PID 1 (or under a tiny init) on the sandbox's own python3, stdlib only. Started with a listening
unix socket on fd ``BRANCHBOX_LISTEN_FD`` (default 3) or a character device ``BRANCHBOX_CHARDEV`` (a microVM's
virtio-serial port, see :class:`CharDevice`), the base environment of every child in
``BRANCHBOX_ENV`` (JSON) and the default working directory in ``BRANCHBOX_WORKDIR``. Event-driven: one asyncio
loop, one SIGCHLD handler that reaps every child (orphans too), readers/writers on pipes, no polling.
See docs/agent-protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from . import archive, users, wire

AGENT_VERSION = "0.1.0"
READ_SIZE = 64 * 1024  # one read from a process pipe (always below the DATA frame limit)
TAIL_LIMIT = 128 * 1024  # combined stdout+stderr bytes kept per process for attach
MAX_EXITED = 256  # exited background processes remembered for processes.list / attach
ACK_EVERY = wire.INITIAL_WINDOW // 4  # return credit to the host once this much of its DATA was consumed
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_WORD = r"[A-Za-z0-9_./:=,@%+-]+"
_SIMPLE = re.compile(rf" *{_WORD}(?: +{_WORD})* *")
SHELL_WORDS = frozenset(
    """. : [ [[ ]] alias bg bind break builtin caller case cd command compgen complete compopt continue
    coproc declare dirs disown do done echo elif else enable esac eval exec exit export false fc fg fi for
    function getopts hash help history if in jobs kill let local logout mapfile popd printf pushd pwd read
    readarray readonly return select set shift shopt source suspend test then time times trap true type
    typeset ulimit umask unalias unset until wait while""".split()  # noqa: SIM905 - a word list reads better
)

# exec's errors for a program that is not there or cannot run (where a shell answers 127 or 126)
_NOT_RUNNABLE = (errno.ENOENT, errno.EACCES, errno.ENOEXEC)
_ERRNO_CODES = {
    errno.ENOENT: "file_not_found",
    errno.EEXIST: "file_exists",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTEMPTY: "conflict",
    errno.ENOEXEC: "bad_request",  # a program exec cannot run (a script without #!, another architecture)
}


class CallError(Exception):
    """Ends a call with ``{"error": {"code", "message", "details"?}}``."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def os_error(exc: OSError, path: str | None = None, **details: Any) -> CallError:
    """Map an OSError to a stable error code (``details`` join its errno in the error's details)."""
    code = _ERRNO_CODES.get(exc.errno or 0, "internal")
    message = exc.strerror or str(exc)
    where = path or exc.filename
    if where is not None:
        message = f"{message}: {where}"
    if exc.errno == errno.ENOTEMPTY:
        message += " (pass recursive=true to remove a non-empty directory)"
    return CallError(code, message, errno=exc.errno, **details)


def is_simple_command(cmd: str) -> bool:
    """True when ``cmd`` can be run without a shell with the same meaning (see the protocol doc)."""
    if not _SIMPLE.fullmatch(cmd):
        return False
    first = cmd.split(maxsplit=1)[0]
    return first not in SHELL_WORDS and "=" not in first and not first.startswith("%")


def _builtin_twin(words: list[str], path: str) -> bool:
    """True for ``true``, ``false`` (no arguments) and ``echo`` (not ``--help``/``--version``) when the program of
    that name is on ``path``: it prints and exits exactly like the bash builtin for simple words."""
    name, args = words[0], words[1:]
    if name in ("true", "false"):
        ok = not args
    elif name == "echo":
        ok = not any(a in ("--help", "--version") for a in args)
    else:
        return False
    return ok and shutil.which(name, path=path) is not None


def shell_argv(cmd: str, path: str = DEFAULT_PATH) -> list[str]:
    """The argv that runs ``cmd``: itself split on spaces when that means the same as the shell would, else a
    shell. ``path`` is the PATH the command will run with."""
    if is_simple_command(cmd):
        return cmd.split()
    if _SIMPLE.fullmatch(cmd) and _builtin_twin(words := cmd.split(), path):
        return words
    return in_shell(cmd)


def in_shell(cmd: str) -> list[str]:
    """The argv that runs ``cmd`` under bash (or sh where there is no bash)."""
    shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
    return [shell, "-c", cmd]


class Agent:
    """Process-wide state: settings, the process table and the open connections."""

    def __init__(self, env: dict[str, str], workdir: str) -> None:
        self.boot_env = dict(env)  # the template's environment, kept for configure()
        self.env = env
        self.workdir = workdir
        self.user: str | None = None  # default user of exec (None: the agent's own, root)
        self.procs: dict[int, Proc] = {}
        self.exited: deque[int] = deque()
        self.connections: set[Connection] = set()
        self.loop = asyncio.get_running_loop()
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.oom = OomScore()
        # posix_spawn closes nothing: it is used only once every descriptor of ours is close-on-exec (Python makes
        # its own so; the ones handed to us at start, SCM_RIGHTS ones included, are made so here)
        self.home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.posix_spawn = hasattr(os, "posix_spawn") and _no_inheritable_fds()

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, raw: Any, name: str = "path") -> str:
        """Normalise a sandbox path; relative paths start at the workdir. ``..`` may not climb above /."""
        if not isinstance(raw, str) or not raw:
            raise CallError("invalid_path", f"{name} must be a non-empty string")
        if "\x00" in raw:
            raise CallError("invalid_path", f"{name} contains a NUL byte")
        full = raw if raw.startswith("/") else self.workdir.rstrip("/") + "/" + raw
        parts: list[str] = []
        for part in full.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise CallError("invalid_path", f"{name} {raw!r} climbs above /")
                parts.pop()
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    # -- processes -----------------------------------------------------------------------------------
    def spawn_plain(self, argv: list[str], env: dict[str, str], cwd: str, stdio: tuple[int, int, int]) -> int | None:
        """Start a child with ``posix_spawn`` (libc's vfork + exec) in its own session; its pid, or None when this
        case needs ``Popen``, whose setup in Python is the cost saved: an ``exec true`` round trip in a microVM under
        TCG 12.9 -> 11.7 ms, 1.14 -> 1.07 ms natively (interleaved in one agent).

        The same child as ``Popen(argv, cwd=cwd, env=env, start_new_session=True, close_fds=True)``: the program is
        looked up on ``env``'s PATH after the chdir, SIGPIPE and SIGXFSZ (ignored by Python) are reset, no signal
        is blocked, only the three stdio descriptors are inherited. One difference: glibc leaves its two internal
        signals (32, 33) ignored in the child, which glibc programs take back when they use them. A failure (not
        found, not executable, a libc without setsid) returns None, so that Popen runs and reports it in its own
        terms."""
        if not self.posix_spawn or min(stdio) < 3:  # dup2 onto itself would keep close-on-exec
            return None
        try:
            os.chdir(cwd)  # the child's, and the base of a relative program or PATH entry
        except OSError:
            return None
        try:
            exe = _lookup(argv[0], env.get("PATH", os.defpath))
            if exe is None:
                return None
            actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
            return os.posix_spawn(exe, argv, env, file_actions=actions, setsid=True, setsigdef=_SIGDEF, setsigmask=())
        except (OSError, NotImplementedError):
            return None
        finally:
            os.fchdir(self.home)

    def reap(self) -> None:
        """SIGCHLD: collect every exited child, dispatch statuses of our own to their records."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is not None and proc.exit_code is None:
                proc.on_exit(status)

    def retire(self, proc: Proc) -> None:
        """A process finished (exited and its output drained)."""
        if proc.background or proc.orphaned:
            self.exited.append(proc.pid)
            while len(self.exited) > MAX_EXITED:
                old = self.exited.popleft()
                rec = self.procs.get(old)
                if rec is not None and rec.finished:
                    del self.procs[old]
        elif self.procs.get(proc.pid) is proc:
            del self.procs[proc.pid]

    def lookup(self, params: dict[str, Any]) -> Proc:
        pid = params.get("pid")
        proc = self.procs.get(pid) if isinstance(pid, int) else None
        if proc is None:
            raise CallError("process_not_found", f"no process with pid {pid!r}: see processes.list")
        return proc


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


_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # what Python ignores and Popen's restore_signals resets on Linux


@functools.cache
def _no_inheritable_fds() -> bool:
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


def _lookup(name: str, path: str) -> str | None:
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


def _child_setup(reset_oom: bool, ctty: bool, ids: tuple[int, int, list[int]] | None) -> Callable[[], None] | None:
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


def _resolve_user(user: Any) -> tuple[int, int, list[int], str, str]:
    """(uid, gid, groups, name, home) for a user name or uid, from the sandbox's /etc/passwd and /etc/group as
    parsed by the agent itself (:mod:`users`): never through NSS, which would load the sandbox's libnss_*.so."""
    if isinstance(user, bool) or not (isinstance(user, int) or (isinstance(user, str) and user)):
        raise CallError("bad_request", "user must be a user name or a uid")
    try:
        u = users.lookup(user)
    except users.UserError as exc:
        raise CallError("bad_request", str(exc)) from None
    return u.uid, u.gid, u.groups, u.name, u.home


def _winsize(cols: int, rows: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


class Proc:
    """One child process: its pipes (or pty), exit status, output tail and attached sinks."""

    def __init__(self, agent: Agent, argv: list[str], tag: str | None, background: bool) -> None:
        self.agent = agent
        self.argv = argv
        self.tag = tag
        self.background = background
        self.orphaned = False
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.pty_fd: int | None = None
        self.is_pty = False
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.finished = False
        self.timed_out = False
        self.timeout: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.out_fds: dict[int, int] = {}  # fd -> stream
        self.out_bytes = [0, 0, 0]
        self.stdin_fd: int | None = None
        self.stdin_buf: deque[tuple[Sink | None, memoryview]] = deque()
        self.stdin_eof = False
        self.tail: deque[tuple[int, bytes]] = deque()
        self.tail_size = 0
        self.sinks: list[Sink] = []
        self.paused = False

    def start(
        self,
        env: dict[str, str],
        cwd: str,
        ids: tuple[int, int, list[int]] | None,
        stdin: bool,
        pty: tuple[int, int] | None,
    ) -> None:
        """Spawn; raises OSError from exec (command not found, ...)."""
        agent = self.agent
        close: list[int] = []
        try:
            if pty is not None:
                master, slave = os.openpty()
                close.append(slave)
                self.pty_fd = master
                self.is_pty = True
                fcntl.ioctl(master, termios.TIOCSWINSZ, _winsize(*pty))
                stdin_arg: int = slave
                out = err = slave
            else:
                if stdin:
                    rfd, wfd = os.pipe()
                    close.append(rfd)
                    self.stdin_fd = wfd
                    stdin_arg = rfd
                else:
                    stdin_arg = agent.devnull
                r1, out = os.pipe()
                close.append(out)
                r2, err = os.pipe()
                close.append(err)
                self.out_fds = {r1: wire.STDOUT, r2: wire.STDERR}
            reset = agent.oom.reset
            toggled = reset and pty is None and ids is None and agent.oom.zero()
            try:
                pid = None
                if pty is None and ids is None and (toggled or not reset):
                    pid = agent.spawn_plain(self.argv, env, cwd, (stdin_arg, out, err))
                if pid is None:
                    self.popen = subprocess.Popen(
                        self.argv,
                        stdin=stdin_arg,
                        stdout=out,
                        stderr=err,
                        cwd=cwd,
                        env=env,
                        start_new_session=True,
                        close_fds=True,
                        # the agent is single-threaded, so preexec_fn is safe here
                        preexec_fn=_child_setup(reset and not toggled, pty is not None, ids),  # noqa: PLW1509
                    )
                    pid = self.popen.pid
            finally:
                if toggled:
                    agent.oom.restore()
        except BaseException:
            for fd in [*self.out_fds, self.stdin_fd, self.pty_fd]:
                if fd is not None:
                    os.close(fd)
            self.out_fds, self.stdin_fd, self.pty_fd = {}, None, None
            raise
        finally:
            for fd in close:
                os.close(fd)
        self.pid = pid
        if self.pty_fd is not None:
            os.set_blocking(self.pty_fd, False)
            self.stdin_fd = os.dup(self.pty_fd)
            self.out_fds = {self.pty_fd: wire.STDOUT}
        if self.stdin_fd is not None:
            os.set_blocking(self.stdin_fd, False)
        for fd in self.out_fds:
            os.set_blocking(fd, False)
            agent.loop.add_reader(fd, self.on_readable, fd)
        agent.procs[self.pid] = self

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "cmd": self.argv,
            "tag": self.tag,
            "running": self.exit_code is None,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "pty": self.is_pty,
            "background": self.background or self.orphaned,
        }

    def result(self) -> dict[str, Any]:
        return {"pid": self.pid, "exit_code": self.exit_code, "signal": self.signal}

    # -- output ------------------------------------------------------------------------------------
    def on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:  # EIO: every pty slave was closed
            data = b""
        stream = self.out_fds[fd]
        if not data:
            self.agent.loop.remove_reader(fd)
            del self.out_fds[fd]
            os.close(fd)
            if fd == self.pty_fd:
                self.pty_fd = None
            if not self.out_fds and self.exit_code is None:
                self.try_reap()
            self.check_finished()
            return
        self.out_bytes[stream] += len(data)
        tail = self.tail
        tail.append((stream, data))
        self.tail_size += len(data)
        while self.tail_size > TAIL_LIMIT:
            s, chunk = tail[0]
            extra = self.tail_size - TAIL_LIMIT
            if len(chunk) <= extra:
                tail.popleft()
                self.tail_size -= len(chunk)
            else:
                tail[0] = (s, chunk[extra:])
                self.tail_size -= extra
        blocked = False
        for sink in self.sinks:
            if not sink.push(stream, data):
                blocked = True
        if blocked:
            self.pause()

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            for fd in self.out_fds:
                self.agent.loop.remove_reader(fd)

    def maybe_resume(self) -> None:
        if self.paused and not any(s.pending for s in self.sinks):
            self.paused = False
            for fd in self.out_fds:
                self.agent.loop.add_reader(fd, self.on_readable, fd)

    # -- stdin -------------------------------------------------------------------------------------
    def write_stdin(self, data: bytes, sink: Sink | None) -> None:
        if self.stdin_fd is None or self.stdin_eof:
            if sink is not None:
                sink.ack(len(data))
            return
        if not self.stdin_buf:
            try:
                n = os.write(self.stdin_fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close_stdin()
                if sink is not None:
                    sink.ack(len(data))
                return
            if sink is not None and n:
                sink.ack(n)
            if n == len(data):
                return
            self.agent.loop.add_writer(self.stdin_fd, self.on_writable)
            data = data[n:]
        self.stdin_buf.append((sink, memoryview(data)))

    def on_writable(self) -> None:
        assert self.stdin_fd is not None
        buf = self.stdin_buf
        while buf:
            sink, view = buf[0]
            try:
                n = os.write(self.stdin_fd, view)
            except BlockingIOError:
                return
            except OSError:
                self.close_stdin()
                return
            if sink is not None:
                sink.ack(n)
            if n < len(view):
                buf[0] = (sink, view[n:])
                return
            buf.popleft()
        self.agent.loop.remove_writer(self.stdin_fd)
        if self.stdin_eof:
            self._close_stdin_fd()

    def request_stdin_eof(self) -> None:
        """EOF from the host: close stdin once buffered input is written (a pty gets ^D instead)."""
        if self.stdin_fd is None or self.stdin_eof:
            return
        if self.is_pty:
            self.write_stdin(b"\x04", None)
            return
        self.stdin_eof = True
        if not self.stdin_buf:
            self._close_stdin_fd()

    def close_stdin(self) -> None:
        """Drop pending input (the reader went away or the process exited)."""
        if self.stdin_fd is None:
            return
        for sink, view in self.stdin_buf:
            if sink is not None:
                sink.ack(len(view))
        if self.stdin_buf:
            self.agent.loop.remove_writer(self.stdin_fd)
        self.stdin_buf.clear()
        self._close_stdin_fd()

    def _close_stdin_fd(self) -> None:
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def kill(self, sig: int) -> None:
        """Signal the whole process group."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            if self.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        self.timer = self.agent.loop.call_later(timeout, self.on_timeout)

    def on_timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        self.kill(signal.SIGKILL)

    def try_reap(self) -> None:
        """All output closed, which is usually the exit: collect it now rather than an event loop turn later, when
        SIGCHLD's handler runs (the result goes out at once: ~0.1-0.2 ms per exec under TCG, interleaved)."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == self.pid:
            self.on_exit(status)

    def on_exit(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            self.signal = -code
            code = 128 - code
        self.exit_code = code
        if self.popen is not None:
            self.popen.returncode = code  # we reaped it: keep Popen from ever calling waitpid
            self.popen = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.close_stdin()
        self.check_finished()

    def check_finished(self) -> None:
        if self.finished or self.exit_code is None or self.out_fds:
            return
        self.finished = True
        for sink in list(self.sinks):
            sink.flush()
        self.agent.retire(self)


class Handler:
    """A call that keeps receiving frames after its CALL (exec, attach, files.read, files.write)."""

    def __init__(self, conn: Connection, channel: int) -> None:
        self.conn = conn
        self.channel = channel
        self.window = wire.INITIAL_WINDOW  # DATA bytes the host may still send on this call
        conn.calls[channel] = self

    def received(self, n: int) -> None:
        """``n`` bytes of the host's DATA arrived: beyond the credit granted is a protocol error."""
        self.window -= n
        if self.window < 0:
            raise wire.ProtocolError(f"the host sent DATA beyond its window on channel {self.channel}")

    def end(self, body: dict[str, Any]) -> None:
        if self.conn.calls.get(self.channel) is self:
            del self.conn.calls[self.channel]
            self.conn.send(result_frame(self.channel, body))

    def on_data(self, stream: int, data: bytes) -> None:
        """Host sent input (ignored unless overridden)."""

    def on_eof(self, stream: int) -> None:
        """Host closed its input (ignored unless overridden)."""

    def on_window(self, credit: int) -> None:
        """Host granted credit (ignored unless overridden)."""

    def on_cancel(self) -> None:
        self.end({"error": {"code": "cancelled", "message": "cancelled by the host"}})

    def on_lost(self) -> None:
        """The connection closed."""


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


def _fd_chunks(fd: int, limit: int | None = None) -> Iterator[bytes]:
    """A file's bytes; more than ``limit`` (a file growing while it is read) fails the read with EFBIG."""
    size = 0
    while data := os.read(fd, wire.CHUNK_SIZE):
        size += len(data)
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"the file grew past {limit} bytes while it was read")
        yield data


class FileWriter(Receiver):
    """files.write: DATA to a temp file next to the target; EOF -> fsync, chmod, rename."""

    def __init__(self, conn: Connection, channel: int, path: str, mode: int | None) -> None:
        parent = os.path.dirname(path) or "/"
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                raise CallError("is_a_directory", f"Is a directory: {path}")
            try:
                os.makedirs(parent, exist_ok=True)
            except FileExistsError:
                raise CallError("not_a_directory", f"Not a directory: {parent}") from None
            self.tmp = f"{parent.rstrip('/')}/.{os.path.basename(path)}.bbtmp-{os.urandom(6).hex()}"
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise os_error(exc, path) from exc
        super().__init__(conn, channel)
        self.path = path
        self.mode = mode

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
            os.fchmod(self.fd, mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
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


def result_frame(channel: int, body: dict[str, Any]) -> bytes:
    """RESULT frame: ``body`` is either ``{"error": {...}}`` or the method's result object."""
    if "error" in body:
        return wire.encode_json(wire.RESULT, channel, body)
    return wire.encode_json(wire.RESULT, channel, {"result": body})


def entry(path: str, name: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """A FileEntry as a dict (lstat: symlinks are reported as symlinks)."""
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
    }


class Connection(asyncio.Protocol):
    """One host connection: parses frames and dispatches them to methods and running calls."""

    def __init__(self, agent: Agent, *, host_starts: bool = False) -> None:
        self.agent = agent
        self.host_starts = host_starts  # a character device: the host opens each session with a HELLO
        self.parser = wire.FrameParser()
        self.calls: dict[int, Handler] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.agent.connections.add(self)
        if not self.host_starts:
            transport.write(wire.encode_json(wire.HELLO, 0, self.hello()))

    def hello(self, nonce: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "protocol": wire.PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "methods": sorted(METHODS),
        }
        if nonce is not None:
            body["nonce"] = nonce
        return body

    def new_session(self, payload: bytes) -> None:
        """A HELLO from the host: the calls of the previous session end as on a lost connection; answer HELLO."""
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.on_lost()
        try:
            req = wire.decode_json(payload) if payload else {}
        except wire.ProtocolError:
            req = {}
        nonce = req.get("nonce") if isinstance(req, dict) else None
        self.send(wire.encode_json(wire.HELLO, 0, self.hello(nonce if isinstance(nonce, str) else None)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.connections.discard(self)
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.on_lost()
        self.transport = None

    def send(self, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
            for kind, channel, payload in frames:
                if kind == wire.CALL:
                    self.on_call(channel, payload)
                    continue
                if kind == wire.HELLO:
                    self.new_session(payload)
                    continue
                call = self.calls.get(channel)
                if call is None:
                    continue  # late frame for a call that already ended
                if kind == wire.DATA:
                    stream, chunk = wire.split_stream(payload)
                    call.received(len(chunk))
                    call.on_data(stream, chunk)
                elif kind == wire.WINDOW:
                    call.on_window(wire.decode_window(payload))
                elif kind == wire.EOF:
                    call.on_eof(wire.split_stream(payload)[0])
                elif kind == wire.CANCEL:
                    call.on_cancel()
        except wire.ProtocolError as exc:
            print(f"branchbox agent: closing connection: {exc}", file=sys.stderr)
            if self.transport is not None:
                self.transport.abort()

    def on_call(self, channel: int, payload: bytes) -> None:
        busy = channel in self.calls
        try:
            func, params = self.parse_call(channel, payload)
            result = func(self, channel, params)
        except CallError as exc:
            result = {"error": exc.to_dict()}
        except OSError as exc:
            result = {"error": os_error(exc).to_dict()}
        except wire.ProtocolError as exc:
            result = {"error": {"code": "bad_request", "message": str(exc)}}
        except (TypeError, ValueError, KeyError) as exc:
            result = {"error": {"code": "bad_request", "message": f"bad params: {exc!r}"}}
        except Exception as exc:  # keep serving: report the bug to the host
            result = {"error": {"code": "internal", "message": f"agent bug: {exc!r}"}}
        if result is not None:
            if not busy:  # drop a handler the failing method may have registered
                self.calls.pop(channel, None)
            self.send(result_frame(channel, result))

    def parse_call(self, channel: int, payload: bytes) -> tuple[Method, dict[str, Any]]:
        if channel in self.calls:
            raise CallError("bad_request", f"channel {channel} already has a running call")
        msg = wire.decode_json(payload)
        if not isinstance(msg, dict):
            raise CallError("bad_request", "CALL payload must be a JSON object")
        method = msg.get("method")
        params = msg.get("params") or {}
        func = METHODS.get(method) if isinstance(method, str) else None
        if func is None:
            raise CallError("bad_request", f"unknown method {method!r}: see HELLO 'methods'")
        if not isinstance(params, dict):
            raise CallError("bad_request", "params must be a JSON object")
        return func, params


# -- methods: each returns the RESULT body, or None when a Handler will end the call ------------------
Method = Callable[[Connection, int, dict[str, Any]], "dict[str, Any] | None"]


def m_ping(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "pid": os.getpid()}


def m_configure(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    """Personalise a (pooled) sandbox: base env = boot env + ``env``; default ``workdir`` and ``user``."""
    agent = conn.agent
    env = params.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise CallError("bad_request", "env must be an object of strings")
    workdir = params.get("workdir")
    if workdir is not None:
        agent.workdir = agent.path(workdir, "workdir")
    user = params.get("user")
    if user is not None and not isinstance(user, str):
        raise CallError("bad_request", "user must be a string")
    agent.env = {**agent.boot_env, **env}
    agent.user = user or None
    return {"workdir": agent.workdir, "user": agent.user}


RNDADDENTROPY = 0x40085203  # _IOW('R', 3, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 7)


HOSTS_MARK = (
    "# branchbox: this sandbox's names (rewritten at each start; give the template an /etc/hosts to keep yours)"
)


def _write_small(path: str, text: str) -> None:
    # not through a symlink: a link there (the sandbox's own doing) is left as it is, with a line in the log
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def write_host_files(hostname: str, etc: str = "/etc") -> None:
    """``/etc/hostname`` and ``/etc/hosts`` of ``hostname``, as Docker writes them per container, so that
    ``localhost`` and the sandbox's own name resolve (mmdebstrap writes no /etc/hosts and copies the build host's
    /etc/hostname). An /etc/hosts of the template's own (not empty, not written here) is kept. A read-only root
    leaves both as they are. Written in place, not renamed into place: at a boot nothing reads them yet, and it
    costs half as much on an overlay (~0.4 ms here, on the cold create's path)."""
    try:
        with open(f"{etc}/hosts", encoding="utf-8", errors="replace") as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    except OSError:
        return
    try:
        if not current.strip() or current.startswith(HOSTS_MARK):
            hosts = f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
            _write_small(f"{etc}/hosts", f"{HOSTS_MARK}\n{hosts}")
        _write_small(f"{etc}/hostname", hostname + "\n")
    except OSError as exc:
        print(f"branchbox agent: {etc}/hosts and {etc}/hostname left as they are ({exc})", file=sys.stderr)


def m_identity(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    """Make a clone unique (a VM restored from a memory snapshot): hostname (and /etc/hosts, /etc/hostname),
    machine-id, RNG reseed, clock."""
    done: dict[str, Any] = {}
    hostname = params.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not 0 < len(hostname) <= 64:
            raise CallError("bad_request", "hostname must be a string of 1-64 characters")
        if socket.gethostname() != hostname:  # a container's backend renames it from outside (no CAP_SYS_ADMIN here)
            socket.sethostname(hostname)
        if os.getpid() == 1:
            write_host_files(hostname)
        done["hostname"] = hostname
    machine_id = params.get("machine_id")
    if machine_id is not None:
        if not isinstance(machine_id, str) or not re.fullmatch(r"[0-9a-f]{32}", machine_id):
            raise CallError("bad_request", "machine_id must be 32 lowercase hex digits")
        tmp = "/etc/.machine-id.bbtmp"
        with open(tmp, "w") as f:
            f.write(machine_id + "\n")
        os.chmod(tmp, 0o444)
        os.rename(tmp, "/etc/machine-id")
        done["machine_id"] = machine_id
    entropy = params.get("entropy")
    if entropy is not None:
        seed = bytes.fromhex(str(entropy))
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            try:  # credit the host's randomness and reseed the CRNG now (root in a VM)
                fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
                fcntl.ioctl(fd, RNDRESEEDCRNG)
                done["reseeded"] = True
            except OSError:
                os.write(fd, seed)  # mixed in, not credited
                done["reseeded"] = False
        finally:
            os.close(fd)
    now = params.get("time")
    if now is not None:
        time.clock_settime(time.CLOCK_REALTIME, float(now))
        done["time"] = time.time()
    return done


def _int_param(params: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = params.get(name, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise CallError("bad_request", f"{name} must be an integer")
    return value


def m_exec(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any] | None:
    agent = conn.agent
    cmd = params.get("cmd")
    if isinstance(cmd, str):
        if "\x00" in cmd:
            raise CallError("bad_request", "cmd contains a NUL byte")
    elif not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
        raise CallError("bad_request", "cmd must be a non-empty string or list of strings")
    elif any("\x00" in a for a in cmd):
        raise CallError("bad_request", "cmd contains a NUL byte")
    env = dict(agent.env)
    extra = params.get("env") or {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise CallError("bad_request", "env must map strings to strings")
    cwd = agent.path(params.get("cwd") or agent.workdir, "cwd")
    try:
        if not stat.S_ISDIR(os.stat(cwd).st_mode):
            raise CallError("not_a_directory", f"cwd is not a directory: {cwd}")
    except OSError as exc:
        raise os_error(exc, cwd) from exc
    ids = None
    user = params.get("user") or agent.user
    if user is not None:
        uid, gid, groups, name, home = _resolve_user(user)
        ids = (uid, gid, groups)
        env.update({"HOME": home, "USER": name, "LOGNAME": name})
    env.update(extra)
    argv = shell_argv(cmd, env.get("PATH", DEFAULT_PATH)) if isinstance(cmd, str) else list(cmd)
    pty = None
    if params.get("pty") is not None:
        size = params["pty"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise CallError("bad_request", "pty must be [cols, rows]")
        pty = (size[0], size[1])
        env.setdefault("TERM", "xterm-256color")
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise CallError("bad_request", "timeout must be a positive number of seconds")
    background = bool(params.get("background"))
    tag = params.get("tag")
    proc = Proc(agent, argv, tag if isinstance(tag, str) else None, background)
    try:
        _start_as_a_shell_would(proc, cmd, lambda: proc.start(env, cwd, ids, bool(params.get("stdin")), pty))
    except subprocess.SubprocessError as exc:
        raise CallError("internal", f"child setup failed (user, pty or oom_score_adj): {exc}") from exc
    except OSError as exc:
        if (no_shell := _no_shell(proc.argv, cmd)) is not None:
            raise no_shell from exc
        if exc.errno not in _NOT_RUNNABLE:
            raise os_error(exc, argv[0]) from exc
        if background:  # no process to give a pid to; ``program`` tells a streamed run's caller what to answer
            raise os_error(exc, argv[0], program=argv[0]) from exc
        # a foreground exec behaves like a shell: 127 not found, 126 not executable
        exit_code, line = wire.not_runnable(argv[0], exc.errno)
        conn.send(wire.encode_data(channel, wire.STDERR, line))
        return {"pid": None, "exit_code": exit_code, "signal": None}
    if timeout is not None:
        proc.set_timeout(float(timeout))
    if not background:
        Sink(conn, channel, proc, owner=True)
        return None
    conn.send(wire.encode_json(wire.EVENT, channel, {"event": "started", "pid": proc.pid}))
    if params.get("attach"):
        Sink(conn, channel, proc, owner=True)
        return None
    return {"pid": proc.pid}


def _start_as_a_shell_would(proc: Proc, cmd: str | list[str], start: Callable[[], None]) -> None:
    """``start()`` ``proc``. A command line run without a shell whose program is missing or cannot run is started
    again under the shell, which reports it as a shell does (127 not found, 126 not executable, a script without
    #! run), in the foreground, the background and streamed alike."""
    try:
        start()
    except OSError as exc:
        if not isinstance(cmd, str) or exc.errno not in _NOT_RUNNABLE or proc.argv == (shelled := in_shell(cmd)):
            raise
        if not os.access(shelled[0], os.X_OK):
            raise  # no shell to ask (a shell-less image): the program itself is what is missing
        proc.argv = shelled
        start()


NO_SHELL = (
    "the sandbox's image has no shell ({shell}): a command string that needs one (pipes, variables, quotes, "
    "builtins) cannot run; pass the command as a list of arguments, e.g. ['/app/server', '--port', '8080'], "
    "or add a shell to the image"
)


def _no_shell(argv: list[str], cmd: str | list[str]) -> CallError | None:
    """The error for a command string whose shell is missing from the image, else None."""
    if isinstance(cmd, str) and argv == in_shell(cmd) and not os.access(argv[0], os.X_OK):
        return CallError("bad_request", NO_SHELL.format(shell=argv[0]), reason="no_shell")
    return None


def m_processes_list(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"processes": [p.info() for p in conn.agent.procs.values()]}


def m_processes_attach(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any] | None:
    proc = conn.agent.lookup(params)
    sink = Sink(conn, channel, proc, owner=False)
    conn.send(wire.encode_json(wire.EVENT, channel, {"event": "attached", **proc.info()}))
    if params.get("tail", True):
        sink.pending.extend(proc.tail)
        if sink.pending:
            proc.pause()
    sink.flush()
    return None


def m_processes_kill(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    proc = conn.agent.lookup(params)
    sig = _int_param(params, "signal", signal.SIGKILL)
    assert sig is not None
    if proc.exit_code is None:
        proc.kill(sig)
    return {"pid": proc.pid, "running": proc.exit_code is None}


def m_pty_resize(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    proc = conn.agent.lookup(params)
    cols, rows = _int_param(params, "cols"), _int_param(params, "rows")
    if cols is None or rows is None or cols <= 0 or rows <= 0:
        raise CallError("bad_request", "cols and rows must be positive integers")
    if proc.pty_fd is None:
        raise CallError("bad_request", f"process {proc.pid} has no (open) pty")
    fcntl.ioctl(proc.pty_fd, termios.TIOCSWINSZ, _winsize(cols, rows))
    return {"pid": proc.pid}


def m_files_read(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    path = conn.agent.path(params.get("path"))
    limit = _int_param(params, "max_size")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, path) from exc
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode) or (limit is not None and st.st_size > limit):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CallError("is_a_directory", f"Is a directory: {path}")
        raise CallError(
            "payload_too_large",
            f"{path} is {st.st_size} bytes, more than the {limit} a whole read returns: stream it instead "
            "(sbx.files.download(path, target), GET /files without max_size)",
            size=st.st_size,
            max_size=limit,
        )
    ChunkSender(conn, channel, _fd_chunks(fd, limit), functools.partial(os.close, fd)).pump()


def m_files_write(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    path = conn.agent.path(params.get("path"))
    if path == "/":
        raise CallError("is_a_directory", "cannot write to /")
    FileWriter(conn, channel, path, _int_param(params, "mode"))


def m_files_archive(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    path = conn.agent.path(params.get("path"))
    try:
        chunks = archive.tar_chunks(path, wire.CHUNK_SIZE)
    except OSError as exc:
        raise os_error(exc, path) from exc
    ChunkSender(conn, channel, chunks, chunks.close).pump()


def m_files_extract(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    ArchiveWriter(conn, channel, conn.agent.path(params.get("path")))


def m_files_list(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    path = conn.agent.path(params.get("path"))
    depth = _int_param(params, "depth", 1)
    assert depth is not None
    if depth < 1:
        raise CallError("bad_request", "depth must be >= 1")
    batch: list[bytes] = []
    size = 0

    def walk(directory: str, level: int, top: bool) -> None:
        nonlocal size
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if top:
                raise os_error(exc, directory) from exc
            return
        for item in items:
            try:
                data = wire.dumps(entry(item.path, item.name, item.stat(follow_symlinks=False)))
            except OSError:
                continue
            if size + len(data) > wire.MAX_PAYLOAD // 2:
                conn.send(wire.encode(wire.EVENT, channel, b'{"entries":[' + b",".join(batch) + b"]}"))
                batch.clear()
                size = 0
            batch.append(data)
            size += len(data) + 1
            if level < depth and item.is_dir(follow_symlinks=False):
                walk(item.path, level + 1, False)

    walk(path, 1, True)
    conn.send(wire.encode(wire.RESULT, channel, b'{"result":{"entries":[' + b",".join(batch) + b"]}}"))


def m_files_stat(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    path = conn.agent.path(params.get("path"))
    try:
        return entry(path, os.path.basename(path) or "/")
    except OSError as exc:
        raise os_error(exc, path) from exc


def m_files_mkdir(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    path = conn.agent.path(params.get("path"))
    mode = _int_param(params, "mode", 0o755)
    assert mode is not None
    try:
        if params.get("parents", True):
            os.makedirs(path, mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        return entry(path, os.path.basename(path) or "/")
    except OSError as exc:
        raise os_error(exc, path) from exc


def m_files_remove(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    path = conn.agent.path(params.get("path"))
    if path == "/":
        raise CallError("invalid_path", "refusing to remove /")
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if params.get("recursive"):
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
    except OSError as exc:
        raise os_error(exc, path) from exc
    return {"removed": path}


def m_files_rename(conn: Connection, channel: int, params: dict[str, Any]) -> dict[str, Any]:
    src = conn.agent.path(params.get("src"), "src")
    dst = conn.agent.path(params.get("dst"), "dst")
    try:
        os.rename(src, dst)
    except OSError as exc:
        raise os_error(exc, f"{src} -> {dst}") from exc
    return entry(dst, os.path.basename(dst) or "/")


METHODS: dict[str, Method] = {
    "ping": m_ping,
    "configure": m_configure,
    "identity": m_identity,
    "exec": m_exec,
    "processes.list": m_processes_list,
    "processes.attach": m_processes_attach,
    "processes.kill": m_processes_kill,
    "pty.resize": m_pty_resize,
    "files.read": m_files_read,
    "files.write": m_files_write,
    "files.archive": m_files_archive,
    "files.extract": m_files_extract,
    "files.list": m_files_list,
    "files.stat": m_files_stat,
    "files.mkdir": m_files_mkdir,
    "files.remove": m_files_remove,
    "files.rename": m_files_rename,
}


class CharDevice(asyncio.Transport):
    """Sessions over a character device (a virtio-serial port): one stream that exists while the host is connected.

    A port can be opened once and reads EOF while the host side is disconnected. On EOF the session ends (its
    calls end as on a lost connection) and reading stops; the port is switched to ``O_ASYNC``, whose SIGIO the
    kernel sends when the host connects again (or data arrives), so waiting for the host costs nothing. The host
    opens every session with a HELLO frame, answered with HELLO (the agent cannot see a quick reconnect, a
    memory snapshot restored in a new VM, or a new host process on the same stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, agent: Agent) -> None:
        super().__init__()
        self.loop = loop
        self.agent = agent
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        self.out = bytearray()
        self.conn: Connection | None = None
        self.reading = False
        self.writing = False
        loop.add_signal_handler(signal.SIGIO, self.on_sigio)
        self.start_reading()

    def _async(self, on: bool) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC))

    def start_reading(self) -> None:
        self._async(False)
        self.reading = True
        self.conn = Connection(self.agent, host_starts=True)
        self.conn.connection_made(self)
        self.loop.add_reader(self.fd, self.on_readable)

    def end_session(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        self.out.clear()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.connection_lost(None)

    def wait_host(self) -> None:
        self.end_session()
        self._async(True)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not any(ev & select.POLLHUP for _, ev in poller.poll(0)):
            self.start_reading()  # the host came back before O_ASYNC was on

    def on_sigio(self) -> None:
        if not self.reading:
            self.start_reading()

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, wire.CHUNK_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.wait_host()
        elif self.conn is not None:
            self.conn.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.reading:
            return  # no host: the session is gone, its output with it
        self.out += data
        if not self.writing:
            self.flush()

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out)
            except BlockingIOError:
                break
            except OSError:
                self.wait_host()
                return
            del self.out[:n]
        if self.out and not self.writing:
            self.loop.add_writer(self.fd, self.flush)  # the host is slow (or away): resume when writable
            self.writing = True
        elif not self.out and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False

    def abort(self) -> None:
        """A protocol error: drop the session and keep reading; the host's next HELLO starts a new one."""
        self.end_session()
        self.start_reading()

    def close(self) -> None:
        self.abort()

    def is_closing(self) -> bool:
        return False


async def serve(listen_fd: int, env: dict[str, str], workdir: str, chardev: str | None = None) -> None:
    """Serve connections on the listening socket ``listen_fd`` (or sessions on the character device
    ``chardev``) until SIGTERM/SIGINT."""
    if os.getpid() == 1:  # the sandbox's init (never a test's agent on the host): before the first request
        write_host_files(socket.gethostname())
    agent = Agent(env, workdir)
    loop = agent.loop
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    stop = loop.create_future()

    def on_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    agent.reap()
    try:
        if chardev is not None:
            device = CharDevice(loop, chardev, agent)
            try:
                await stop
            finally:
                device.end_session()
        else:
            sock = socket.socket(fileno=listen_fd)  # any listening stream socket: unix, or AF_VSOCK in a microVM
            sock.setblocking(False)
            server = await loop.create_server(lambda: Connection(agent), sock=sock)
            try:
                await stop
            finally:
                server.close()
    finally:
        for proc in list(agent.procs.values()):
            if proc.exit_code is None:
                proc.kill(signal.SIGKILL)


def _base_env(raw: object) -> dict[str, str]:
    env = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


Claim = Callable[[bytes, list[int]], tuple[int, dict[str, str], str]]


def run_primed(ctl_fd: int, claim: Claim, *, max_fds: int, ready: Callable[[], None], warm_up: bool = True) -> None:
    """Start the agent's loop before there is anything to serve (a container backend's spare shell), then wait
    for one request on the SOCK_SEQPACKET socket ``ctl_fd``: ``claim(request, descriptors)`` makes the sandbox
    around this process and returns the listening fd, base environment and workdir; the agent answers ``b"ok"``
    on ``ctl_fd``, closes it and serves. EOF before a request: exit. The start-up work (loop, signal handlers,
    the pages a fork of the zygote copies on first write) is then off the boot path; with ``warm_up`` so are the
    pages of a first connection and exec. ``ready()`` is called once it is done."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_primed(ctl_fd, claim, max_fds, ready, warm_up))


async def _primed(ctl_fd: int, claim: Claim, max_fds: int, ready: Callable[[], None], warm_up: bool) -> None:
    loop = asyncio.get_running_loop()
    if warm_up:
        with contextlib.suppress(Exception):  # a warm-up that fails costs speed only
            await _warm_up()
    ready()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(ctl_fd, wake)
    await readable
    loop.remove_reader(ctl_fd)
    ctl = socket.socket(fileno=ctl_fd)
    raw, fds, _, _ = socket.recv_fds(ctl, 1 << 20, max_fds, socket.MSG_CMSG_CLOEXEC)
    if not raw:
        os._exit(0)
    listen_fd, env, workdir = claim(raw, fds)
    with contextlib.suppress(OSError):  # the zygote is gone: the boot failed, the daemon removes this sandbox
        ctl.send(b"ok")
    ctl.close()
    await serve(listen_fd, _base_env(env), workdir or "/")


async def _warm_up() -> None:
    """One exec through a real connection on a socket pair, served by a throwaway Agent. A primed agent is a fork
    of the zygote: the pages its first connection and first exec write are copied now, not on the boot path."""
    from branchbox.agent.client import AgentClient  # noqa: PLC0415 - preloaded by the zygote (host side only)

    loop = asyncio.get_running_loop()
    agent = Agent({"PATH": DEFAULT_PATH}, "/")
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    ours, theirs = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: Connection(agent), ours)
        client = await AgentClient.over_socket(theirs)
        try:
            await client.exec(["true"], timeout=10)
        finally:
            await client.aclose()
            transport.close()
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)
        os.close(agent.devnull)
        os.close(agent.home)
        if agent.oom.fd >= 0:
            os.close(agent.oom.fd)


def main() -> None:
    """Entry point: settings from the environment (see the module docstring)."""
    listen_fd = int(os.environ.get("BRANCHBOX_LISTEN_FD", "3"))
    env = _base_env(json.loads(os.environ.get("BRANCHBOX_ENV") or "{}"))
    workdir = os.environ.get("BRANCHBOX_WORKDIR") or "/"
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen_fd, env, workdir, os.environ.get("BRANCHBOX_CHARDEV") or None))
    if os.getpid() == 1:
        print(f"branchbox agent: exiting after {time.monotonic() - started:.1f} s", file=sys.stderr)
