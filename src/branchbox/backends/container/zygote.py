"""The zygote: a small single-threaded host-root helper that forks sandboxes on request.

Started by :class:`~branchbox.backends.container.backend.ContainerBackend` as
``python -m branchbox.backends.container.zygote --fd N --parent NAME``; fd N is a SOCK_SEQPACKET socket on
which it receives JSON requests (``{"id", "op": "boot", "req": {...}}``) and answers
``{"id", "ok", "sandbox_id", "pid", "start_time", "cgroups", "phases"}`` or ``{"id", "ok": false, "step",
"error"}``. It builds the seccomp program once, is the child subreaper of every sandbox init (so none is left
a zombie) and exits on EOF; running sandboxes outlive it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchbox.agent.wire import short_unix_path
from branchbox.backends.container import cgroups as cg_mod
from branchbox.backends.container import seccomp_policy, syscalls
from branchbox.backends.container.child import MOUNT_DIR, BootRequest, ChildFds, run_holder

MAX_MESSAGE = 1 << 20
MAX_IN_FLIGHT = 32  # boots advancing at once; further requests wait in order
AGENT_SOCKET = "agent.sock"
AGENT_LOG = "agent.log"
OOM_SCORE_ADJ_AGENT = "-998"


class BootFailure(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


@dataclass(slots=True)
class _Boot:
    """One boot in flight. It advances when its holder or init writes to (or closes) a pipe."""

    req: BootRequest
    sock_path: Path
    stage: str = "cgroup"  # cgroup .. fork (in start), then "unshare", "holder", "init"
    holder: int = 0
    init: int = 0
    made_cgroup: bool = False
    cgroups: dict[str, str] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)  # the zygote's ends: status_r, sync_r, go_w
    data: bytes = b""
    phases: dict[str, float] = field(default_factory=dict)
    t: int = field(default_factory=time.perf_counter_ns)

    def lap(self, name: str) -> None:
        now = time.perf_counter_ns()
        self.phases[name] = round((now - self.t) / 1e6, 3)
        self.t = now

    def close(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_all(self) -> None:
        for name in list(self.fds):
            self.close(name)


class Zygote:
    """Boots sandboxes. Boots overlap: the zygote forks a holder and moves on; each boot advances when its
    children report (``advance``), so a burst of boots (a fork of N, a pool refill) runs on every core."""

    def __init__(self, cgroups: cg_mod.Cgroups, seccomp_bpf: bytes, close_in_child: tuple[int, ...]) -> None:
        self.cgroups = cgroups
        self.seccomp_bpf = seccomp_bpf
        self.close_in_child = close_in_child
        self.in_flight: dict[int, _Boot] = {}  # by the fd the boot waits on

    def _zygote_fds(self) -> tuple[int, ...]:
        """Descriptors a new holder must close at once: the control socket and other boots' pipe ends."""
        return (*self.close_in_child, *(fd for b in self.in_flight.values() for fd in b.fds.values()))

    def start(self, req: BootRequest) -> tuple[_Boot, dict[str, Any] | None]:
        """Make the cgroup, the agent socket and the holder. Returns the boot and, if it already failed, the reply."""
        boot = _Boot(req, Path(req.run_dir) / AGENT_SOCKET)
        child_side: list[int] = []
        try:
            try:
                dirs = self.cgroups.create(req.sandbox_id, req.cpu, req.memory_mb, req.pids)
            except FileExistsError:
                raise BootFailure("cgroup", f"cgroup of {req.sandbox_id} exists: destroy it first") from None
            boot.made_cgroup = True
            boot.cgroups = {k: str(v) for k, v in dirs.items()}
            boot.lap("cgroup")
            boot.stage = "agent socket"
            with contextlib.suppress(FileNotFoundError):
                boot.sock_path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            child_side.append(listener.detach())
            listen_fd = child_side[-1]
            _bind_listen(listen_fd, boot.sock_path)
            log_fd = os.open(Path(req.run_dir) / AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
            child_side.append(log_fd)
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            boot.fds.update(status_r=status_r, sync_r=sync_r, go_w=go_w)
            child_side += [status_w, sync_w, go_r]
            mnt = Path(req.run_dir) / MOUNT_DIR
            (mnt / "root").mkdir(parents=True, exist_ok=True)
            os.chmod(mnt, 0o711)  # noqa: S103 - the sandbox uid must search it to reach the mount point
            boot.lap("socket")
            boot.stage = "fork"
            child_fds = ChildFds(
                status_w=status_w,
                sync_w=sync_w,
                go_r=go_r,
                listen=listen_fd,
                log=log_fd,
                close=(*self._zygote_fds(), status_r, sync_r, go_w),
            )
            boot.holder = os.fork()
            if boot.holder == 0:
                run_holder(req, child_fds, self.cgroups, self.seccomp_bpf)
            boot.lap("fork")
            boot.stage = "unshare"
            return boot, None
        except BootFailure as exc:
            return boot, self._fail(boot, exc.step, exc.message)
        except Exception as exc:  # any failure is reported to the daemon
            return boot, self._fail(boot, boot.stage, str(exc))
        finally:
            for fd in child_side:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def waiting_on(self, boot: _Boot) -> int:
        """The fd whose readability moves ``boot`` on."""
        return boot.fds["status_r" if boot.stage == "init" else "sync_r"]

    def advance(self, boot: _Boot) -> dict[str, Any] | None:
        """Read what the boot's children wrote; return the reply once the boot is over, else None."""
        step = {"unshare": self._unshared, "holder": self._holder_said, "init": self._init_said}[boot.stage]
        try:
            return step(boot)
        except BootFailure as exc:
            return self._fail(boot, exc.step, exc.message)
        except Exception as exc:  # any failure is reported to the daemon
            return self._fail(boot, boot.stage, str(exc))

    def _unshared(self, boot: _Boot) -> dict[str, Any] | None:
        """The holder has its namespaces: write its id maps and let it go on."""
        if os.read(boot.fds["sync_r"], 1) != b"u":
            return self._exited(boot)
        boot.lap("unshare")
        boot.stage = "userns_map"
        idmap = f"0 {boot.req.uid_base} {boot.req.id_count}\n"
        _write(f"/proc/{boot.holder}/uid_map", idmap)
        _write(f"/proc/{boot.holder}/setgroups", "deny")
        _write(f"/proc/{boot.holder}/gid_map", idmap)
        with contextlib.suppress(OSError):  # lowering needs CAP_SYS_RESOURCE on the host
            _write(f"/proc/{boot.holder}/oom_score_adj", OOM_SCORE_ADJ_AGENT)
        os.write(boot.fds["go_w"], b"g")
        boot.close("go_w")
        boot.lap("userns_map")
        boot.stage = "holder"
        return None

    def _holder_said(self, boot: _Boot) -> dict[str, Any] | None:
        """The holder writes the init's pid, then exits (EOF)."""
        chunk = os.read(boot.fds["sync_r"], 64)
        if chunk:
            boot.data += chunk
            return None
        if not boot.data:
            return self._exited(boot)
        boot.init, boot.data = int(boot.data), b""
        boot.holder = 0  # it has exited; the SIGCHLD handler reaps it
        boot.close("sync_r")
        boot.lap("holder")
        boot.stage = "init"
        return None

    def _init_said(self, boot: _Boot) -> dict[str, Any] | None:
        """EOF on the status pipe without a message: the agent runs. A message: the step that failed."""
        chunk = os.read(boot.fds["status_r"], 4096)
        if chunk:
            boot.data += chunk
            return None
        if boot.data:
            return self._fail(boot, *_split(boot.data.decode(errors="replace"), "init"))
        start_time = syscalls.pid_start_time(boot.init)
        boot.lap("init")
        boot.close_all()
        return {
            "ok": True,
            "sandbox_id": boot.req.sandbox_id,
            "pid": boot.init,
            "start_time": start_time,
            "cgroups": boot.cgroups,
            "phases": boot.phases,
        }

    def _exited(self, boot: _Boot) -> dict[str, Any]:
        """The holder exited early: report what it wrote on the status pipe (reading to EOF cannot block)."""
        raw = _read_all(boot.fds["status_r"]).decode(errors="replace")
        step, message = _split(raw, boot.stage) if raw else (boot.stage, "the sandbox process exited without a message")
        return self._fail(boot, step, message)

    def _fail(self, boot: _Boot, step: str, message: str) -> dict[str, Any]:
        self._undo(boot)
        return {"ok": False, "sandbox_id": boot.req.sandbox_id, "step": step, "error": message}

    def _undo(self, boot: _Boot) -> None:
        boot.close_all()
        for pid in (boot.init, boot.holder):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in (boot.holder, boot.init):
            if pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        if boot.made_cgroup:
            self.cgroups.kill(boot.req.sandbox_id)
            deadline = time.monotonic() + 5.0
            while not self.cgroups.remove(boot.req.sandbox_id) and time.monotonic() < deadline:
                time.sleep(0.002)  # only on the failure path: killed processes are still exiting
        with contextlib.suppress(FileNotFoundError):
            boot.sock_path.unlink()


def _bind_listen(fd: int, path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
    try:
        with short_unix_path(path) as short:
            sock.bind(short)
        os.chmod(path, 0o600)
        sock.listen(128)
    finally:
        sock.detach()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _split(message: str, default_step: str) -> tuple[str, str]:
    step, sep, rest = message.partition(": ")
    return (step, rest) if sep else (default_step, message)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(ctl: socket.socket, zygote: Zygote) -> None:
    """Answer requests until the daemon closes its end (then finish the boots in flight)."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    queued: list[dict[str, Any]] = []
    open_ctl = True

    def reply(msg_id: object, answer: dict[str, Any]) -> None:
        answer["id"] = msg_id
        with contextlib.suppress(OSError):
            ctl.send(json.dumps(answer).encode())

    def watch(msg_id: object, boot: _Boot, answer: dict[str, Any] | None) -> None:
        if answer is not None:
            reply(msg_id, answer)
            return
        fd = zygote.waiting_on(boot)
        zygote.in_flight[fd] = boot
        sel.register(fd, selectors.EVENT_READ, (msg_id, boot))

    while open_ctl or zygote.in_flight:
        while queued and len(zygote.in_flight) < MAX_IN_FLIGHT:
            msg = queued.pop(0)
            watch(msg.get("id"), *zygote.start(BootRequest(**msg["req"])))
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap()
            elif key.fileobj == ctl:
                try:
                    raw = ctl.recv(MAX_MESSAGE)
                except InterruptedError:
                    continue
                if not raw:
                    sel.unregister(ctl)
                    open_ctl = False
                    continue
                msg = json.loads(raw)
                if msg.get("op") == "boot":
                    queued.append(msg)
                else:
                    reply(msg.get("id"), {"ok": False, "step": "request", "error": f"unknown op {msg.get('op')!r}"})
            else:
                msg_id, boot = key.data
                fd = int(key.fd)
                sel.unregister(fd)
                del zygote.in_flight[fd]
                watch(msg_id, boot, zygote.advance(boot))
        _reap()


# Modules the agent (or the stdlib code it calls) may import lazily; preloaded because the agent runs with an
# empty sys.path inside the sandbox.
_AGENT_PRELOAD = ("asyncio.unix_events", "encodings.idna", "encodings.latin_1", "grp", "pty", "tty")


def preload_agent() -> None:
    """Import the agent once here so every sandbox init becomes the agent by fork, without exec (~0 ms start)."""
    importlib.import_module("branchbox.agent.server")
    for name in _AGENT_PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="branchbox-zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", default="branchbox")
    args = parser.parse_args(argv)
    ctl = socket.socket(fileno=args.fd)
    ctl.set_inheritable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's ^C is not ours; EOF stops us
    try:
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        bpf = seccomp_policy.build_bpf()
        preload_agent()
        # Everything imported so far moves to the permanent generation: the collector of a forked sandbox init
        # never walks (and so never copies) the pages it shares with the zygote.
        gc.collect()
        gc.freeze()
        cgroups = cg_mod.detect(args.parent)
        cgroups.ensure_parents()
    except (OSError, ImportError) as exc:
        ctl.send(json.dumps({"op": "ready", "ok": False, "error": str(exc)}).encode())
        return 1
    ready = {
        "op": "ready",
        "ok": True,
        "pid": os.getpid(),
        "cgroup_version": cgroups.version,
        "parents": {k: str(v) for k, v in cgroups.parents.items()},
    }
    ctl.send(json.dumps(ready).encode())
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(ctl, Zygote(cgroups, bpf, (ctl.fileno(),)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
