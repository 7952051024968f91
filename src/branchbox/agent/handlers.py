"""The agent's methods: each takes (connection, channel, params) and returns the RESULT body, or None when a
call of ``flow`` ends the call later. :data:`METHODS` names them for the protocol."""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

from . import archive, wire
from .errors import NOT_RUNNABLE, CallError, os_error
from .flow import XATTR_NAMESPACE, ArchiveWriter, ChunkSender, FileWriter, Sink, check_xattr_prefix, entry, fd_chunks
from .protocol import Connection, Method
from .shell import DEFAULT_PATH, in_shell, shell_argv
from .spawn import resolve_user, winsize
from .supervise import Proc
from .watch import m_files_watch


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
        uid, gid, groups, name, home = resolve_user(user)
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
        if exc.errno not in NOT_RUNNABLE:
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
        if not isinstance(cmd, str) or exc.errno not in NOT_RUNNABLE or proc.argv == (shelled := in_shell(cmd)):
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
    fcntl.ioctl(proc.pty_fd, termios.TIOCSWINSZ, winsize(cols, rows))
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
    ChunkSender(conn, channel, fd_chunks(fd, limit), functools.partial(os.close, fd)).pump()


def m_files_write(conn: Connection, channel: int, params: dict[str, Any]) -> None:
    path = conn.agent.path(params.get("path"))
    if path == "/":
        raise CallError("is_a_directory", "cannot write to /")
    owner = params.get("owner")  # a user name or uid: a new file (and new parents) become theirs
    ids = None if owner is None else resolve_user(owner)[:2]
    xattrs = params.get("xattrs") or {}  # extended attributes the written file gets (user.* only)
    if not isinstance(xattrs, dict) or not all(
        isinstance(k, str) and k.startswith(XATTR_NAMESPACE) and len(k) > len(XATTR_NAMESPACE) and isinstance(v, str)
        for k, v in xattrs.items()
    ):
        raise CallError("bad_request", f"xattrs must map {XATTR_NAMESPACE}* names to strings")
    FileWriter(conn, channel, path, _int_param(params, "mode"), ids, xattrs)


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
    xattrs = check_xattr_prefix(params.get("xattrs"))
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
                data = wire.dumps(entry(item.path, item.name, item.stat(follow_symlinks=False), xattrs))
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
    xattrs = check_xattr_prefix(params.get("xattrs"))
    try:
        return entry(path, os.path.basename(path) or "/", xattrs=xattrs)
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
    "files.watch": m_files_watch,
}
