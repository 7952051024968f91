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
import importlib
import json
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any

from branchbox.agent.wire import short_unix_path
from branchbox.backends.container import cgroups as cg_mod
from branchbox.backends.container import seccomp_policy, syscalls
from branchbox.backends.container.child import MOUNT_DIR, BootRequest, ChildFds, run_holder

MAX_MESSAGE = 1 << 20
AGENT_SOCKET = "agent.sock"
AGENT_LOG = "agent.log"
OOM_SCORE_ADJ_AGENT = "-998"


class BootFailure(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class Zygote:
    """Boots sandboxes one request at a time."""

    def __init__(self, cgroups: cg_mod.Cgroups, seccomp_bpf: bytes, close_in_child: tuple[int, ...]) -> None:
        self.cgroups = cgroups
        self.seccomp_bpf = seccomp_bpf
        self.close_in_child = close_in_child

    def boot(self, req: BootRequest) -> dict[str, Any]:
        phases: dict[str, float] = {}
        t = time.perf_counter_ns()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter_ns()
            phases[name] = round((now - t) / 1e6, 3)
            t = now

        step = "cgroup"
        holder = init = 0
        made_cgroup = False
        sock_path = Path(req.run_dir) / AGENT_SOCKET
        fds: list[int] = []
        try:
            try:
                dirs = self.cgroups.create(req.sandbox_id, req.cpu, req.memory_mb, req.pids)
            except FileExistsError:
                raise BootFailure(step, f"cgroup of {req.sandbox_id} exists: destroy it first") from None
            made_cgroup = True
            lap("cgroup")
            step = "agent socket"
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.append(listener.detach())
            listen_fd = fds[-1]
            _bind_listen(listen_fd, sock_path)
            log_fd = os.open(Path(req.run_dir) / AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
            fds.append(log_fd)
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            fds += [status_r, status_w, sync_r, sync_w, go_r, go_w]
            mnt = Path(req.run_dir) / MOUNT_DIR
            (mnt / "root").mkdir(parents=True, exist_ok=True)
            os.chmod(mnt, 0o711)  # noqa: S103 - the sandbox uid must search it to reach the mount point
            lap("socket")
            step = "fork"
            child_fds = ChildFds(
                status_w=status_w,
                sync_w=sync_w,
                go_r=go_r,
                listen=listen_fd,
                log=log_fd,
                close=(*self.close_in_child, status_r, sync_r, go_w),
            )
            holder = os.fork()
            if holder == 0:
                run_holder(req, child_fds, self.cgroups, self.seccomp_bpf)
            for fd in (status_w, sync_w, go_r, listen_fd, log_fd):
                os.close(fd)
                fds.remove(fd)
            lap("fork")
            step = "unshare"
            _expect(os.read(sync_r, 1) == b"u", status_r, step)
            lap("unshare")
            step = "userns_map"
            idmap = f"0 {req.uid_base} {req.id_count}\n"
            _write(f"/proc/{holder}/uid_map", idmap)
            _write(f"/proc/{holder}/setgroups", "deny")
            _write(f"/proc/{holder}/gid_map", idmap)
            with contextlib.suppress(OSError):  # lowering needs CAP_SYS_RESOURCE on the host
                _write(f"/proc/{holder}/oom_score_adj", OOM_SCORE_ADJ_AGENT)
            os.write(go_w, b"g")
            lap("userns_map")
            step = "holder"
            raw = _read_all(sync_r)
            os.waitpid(holder, 0)
            holder = 0
            _expect(bool(raw), status_r, step)
            init = int(raw)
            lap("holder")
            step = "init"
            _raise_reported(status_r, step)
            start_time = syscalls.pid_start_time(init)
            lap("init")
            return {
                "ok": True,
                "sandbox_id": req.sandbox_id,
                "pid": init,
                "start_time": start_time,
                "cgroups": {k: str(v) for k, v in dirs.items()},
                "phases": phases,
            }
        except BootFailure as exc:
            self._undo(req, holder, init, made_cgroup, sock_path)
            return {"ok": False, "sandbox_id": req.sandbox_id, "step": exc.step, "error": exc.message}
        except Exception as exc:  # any failure is reported to the daemon
            self._undo(req, holder, init, made_cgroup, sock_path)
            return {"ok": False, "sandbox_id": req.sandbox_id, "step": step, "error": str(exc)}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _undo(self, req: BootRequest, holder: int, init: int, made_cgroup: bool, sock_path: Path) -> None:
        for pid in (init, holder):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in (holder, init):
            if pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        if made_cgroup:
            self.cgroups.kill(req.sandbox_id)
            deadline = time.monotonic() + 5.0
            while not self.cgroups.remove(req.sandbox_id) and time.monotonic() < deadline:
                time.sleep(0.002)  # only on the failure path: killed processes are still exiting
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


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


def _raise_reported(status_r: int, step: str) -> None:
    """Read the status pipe to EOF; raise the error a child wrote there, if any."""
    raw = _read_all(status_r).decode(errors="replace")
    if raw:
        raise BootFailure(*_split(raw, step))


def _expect(ok: bool, status_r: int, step: str) -> None:
    """When ``ok`` is False the child has exited: raise what it reported (reading to EOF cannot block)."""
    if not ok:
        _raise_reported(status_r, step)
        raise BootFailure(step, "the sandbox process exited without a message")


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(ctl: socket.socket, zygote: Zygote) -> None:
    """Answer requests until the daemon closes its end."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap()
                continue
            try:
                raw = ctl.recv(MAX_MESSAGE)
            except InterruptedError:
                continue
            if not raw:
                return
            msg = json.loads(raw)
            if msg.get("op") == "boot":
                reply = zygote.boot(BootRequest(**msg["req"]))
            else:
                reply = {"ok": False, "step": "request", "error": f"unknown op {msg.get('op')!r}"}
            reply["id"] = msg.get("id")
            ctl.send(json.dumps(reply).encode())
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
