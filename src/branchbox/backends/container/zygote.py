"""The zygote: a small single-threaded host-root helper that forks sandboxes on request.

Started by :class:`~branchbox.backends.container.backend.ContainerBackend` as
``python -m branchbox.backends.container.zygote --fd N --parent NAME``; fd N is a SOCK_SEQPACKET socket on
which it receives JSON requests (``{"id", "op": "boot", "req": {...}}``, ``"op": "status"``, or ``"op": "idmap"``
with ``"pairs"`` of ranges to map ahead) and answers
``{"id", "ok", "sandbox_id", "pid", "start_time", "cgroups", "phases"}`` or ``{"id", "ok": false, "step",
"error"}``. It builds the seccomp program once, is the child subreaper of every sandbox init (so none is left
a zombie) and exits on EOF; running sandboxes outlive it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import itertools
import json
import os
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import branchbox.backends.container.cgroups as cg_mod
import branchbox.backends.container.idmaps as idmaps
import branchbox.backends.container.seccomp_policy as seccomp_policy
import branchbox.backends.container.syscalls as syscalls
from branchbox.agent.wire import short_unix_path
from branchbox.backends.container.child import ROOT, STAGE, BootRequest, HolderFds, run_holder

MAX_MESSAGE = 1 << 20
MAX_IN_FLIGHT = 32  # boots advancing at once; further requests wait in order
SPARES = 4  # shells kept ready (in their namespaces and cgroup) for the next boots
MAX_SPARES = 16  # after a burst of N boots (started within BURST_WINDOW_S), N spares (at most this many) are kept
BURST_WINDOW_S = 1.0
BURST_MEMORY_S = 120.0  # ... for this long
SPARE_NICE = 10  # spares are primed at low priority (nice, and an idle cgroup): they yield to users' work
SPARE_PREFIX = "shell-"  # cgroup names of spare shells: shell-<zygote pid>-<n>
AGENT_SOCKET = "agent.sock"
AGENT_LOG = "agent.log"
OOM_SCORE_ADJ_AGENT = "-998"


class BootFailure(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


def _close_fds(fds: dict[str, int], *names: str) -> None:
    for name in names or list(fds):
        fd = fds.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(slots=True)
class _Shell:
    """A primed sandbox without a root: a holder made its namespaces and cgroup, its init (pid 1) staged /proc,
    /dev, /sys and /tmp and started the agent's loop (see ``child``). A boot request roots it on the request's
    layers. Spares are made ahead of demand; a boot that finds none makes its own."""

    cgroup: str  # a spare's "shell-<zygote pid>-<n>", or the sandbox id it was made for
    id_base: int
    id_count: int
    spare: bool = False  # a spare shell (its range goes back to the spare ranges if it dies unclaimed)
    doomed: bool = False  # a spare whose range a boot took while it was being made: discarded once it reports
    pid: int = 0  # the holder until the shell is ready, then the init
    stage: str = "unshare"  # then "prime", then "ready"
    data: bytes = b""
    fds: dict[str, int] = field(default_factory=dict)  # the zygote's ends: status_r, sync_r, go_w, ctl


@dataclass(slots=True)
class _Boot:
    """One boot in flight. It advances when its shell writes to (or closes) a pipe or its control socket."""

    req: BootRequest
    sock_path: Path
    shell: _Shell | None = None
    stage: str = "cgroup"  # then "shell" (waiting for its own new shell to be ready), "init" (for the ack)
    spare: bool = False  # runs on a claimed spare shell (which may have died while it waited)
    cgroup: str = ""  # the cgroup name to remove on failure
    cgroups: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    t: int = field(default_factory=time.perf_counter_ns)

    def lap(self, name: str) -> None:
        now = time.perf_counter_ns()
        self.phases[name] = round((now - self.t) / 1e6, 3)
        self.t = now


class Zygote:
    """Boots sandboxes on shells. Boots overlap: each advances when its children report (``advance``), so a
    burst (a fork of N, a pool refill) runs on every core; and ``spares`` primed shells wait, so a boot starts
    at the layers: no fork, unshare, cgroup attach, kernel filesystems or agent start on its path."""

    def __init__(
        self,
        cgroups: cg_mod.Cgroups,
        seccomp_bpf: bytes,
        close_in_child: tuple[int, ...],
        *,
        shell_dir: Path,
        spares: int = 0,
        id_base: int = 100000,
        id_count: int = 65536,
        spare_ranges: list[int] | None = None,
        canonical_base: int = 100000,
        maker: idmaps.Maker | None = None,
    ) -> None:
        self.cgroups = cgroups
        self.seccomp_bpf = seccomp_bpf
        self.host_mnt_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.close_in_child = (*close_in_child, self.host_mnt_ns)
        self.shell_dir = shell_dir
        self.spares = spares  # the base number of spares; bursts raise the target for a while (``want``)
        self.target = spares
        self.burst_at = 0.0
        self.id_base, self.id_count = id_base, id_count  # the range spares map (without spare_ranges)
        # per-sandbox ranges (issue 22.1): the daemon lends ranges for spare shells; a boot that claims the spare
        # of range S takes S (the daemon chose it) and lends another (its request's spare_uid_base)
        self.per_sandbox = spare_ranges is not None
        self.spare_ranges: list[int] = list(spare_ranges or [])
        self.canonical_base = canonical_base
        self.idmappings = idmaps.Idmappings(id_count, maker=maker)
        self.ready: list[_Shell] = []  # spare shells that take a request
        self.making: list[_Shell] = []  # spare shells not ready yet
        self.booting: list[_Boot] = []
        self.recent: list[float] = []  # start times of the boots of the last BURST_WINDOW_S
        self._count = itertools.count(1)

    # -- shells ----------------------------------------------------------------------------------------
    def _zygote_fds(self) -> tuple[int, ...]:
        """Descriptors a new holder must close at once: the control socket and every other shell's ends."""
        shells = [*self.ready, *self.making, *(b.shell for b in self.booting if b.shell is not None)]
        return (*self.close_in_child, *(fd for sh in shells for fd in sh.fds.values()))

    def _make_shell(self, cgroup: str, cpu: float, memory_mb: int, pids: int, id_base: int, id_count: int,
                    nice: int, *, spare: bool = False) -> _Shell:  # fmt: skip
        """Make the cgroup and fork a holder into it (it reports on sync_r once unshared)."""
        try:
            self.cgroups.create(cgroup, cpu, memory_mb, pids, idle=nice > 0)
        except FileExistsError:
            raise BootFailure("cgroup", f"cgroup {cgroup} exists: destroy that sandbox first") from None
        shell = _Shell(cgroup, id_base, id_count, spare=spare)
        child_side: list[int] = []
        try:
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            shell.fds.update(status_r=status_r, sync_r=sync_r, go_w=go_w, ctl=ours.detach())
            child_side += [status_w, sync_w, go_r, theirs.detach()]
            fds = HolderFds(
                status_w=status_w,
                sync_w=sync_w,
                go_r=go_r,
                ctl=child_side[-1],
                close=(*self._zygote_fds(), *shell.fds.values()),
                shell_dir=str(self.shell_dir),
            )
            shell.pid = os.fork()
            if shell.pid == 0:  # a spare warms its agent up; a boot's own shell is wanted now
                run_holder(cgroup, fds, self.cgroups, self.seccomp_bpf, nice=nice, warm_up=spare)
        except BaseException:
            self._discard(shell)
            raise
        finally:
            for fd in child_side:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return shell

    def _progress(self, shell: _Shell) -> bool:
        """Read what the shell's holder or init wrote on sync_r; True once the shell is ready (primed).

        Holder: b"u" once unshared (the id maps are written then), then "<init pid>\\n" and exit; init: b"r"
        once primed, then it closes its end (EOF)."""
        if shell.stage == "unshare":
            if os.read(shell.fds["sync_r"], 1) != b"u":
                raise self._died(shell, "unshare", "the holder exited")
            idmap = f"0 {shell.id_base} {shell.id_count}\n"
            _write(f"/proc/{shell.pid}/uid_map", idmap)
            # setgroups stays "allow": host root may write the gid map without denying it, and "deny" would
            # break every exec as another user (the agent's user=, su, runuser, setpriv, sudo) inside.
            _write(f"/proc/{shell.pid}/gid_map", idmap)
            with contextlib.suppress(OSError):  # lowering needs CAP_SYS_RESOURCE on the host
                _write(f"/proc/{shell.pid}/oom_score_adj", OOM_SCORE_ADJ_AGENT)
            os.write(shell.fds["go_w"], b"g")
            _close_fds(shell.fds, "go_w")
            shell.stage = "prime"
            return False
        chunk = os.read(shell.fds["sync_r"], 64)
        if chunk:
            shell.data += chunk
            return False
        # The holder's "<pid>\n" and the init's b"r" come in either order (each write is atomic).
        pid = shell.data.replace(b"r", b"").strip()
        if b"r" not in shell.data or not pid.isdigit():
            raise self._died(shell, "init", "the sandbox process exited without a message")
        shell.pid, shell.data, shell.stage = int(pid), b"", "ready"  # the holder has exited (reaped by _reap)
        _close_fds(shell.fds, "sync_r")
        return True

    @staticmethod
    def _died(shell: _Shell, step: str, default: str) -> BootFailure:
        """The failure a shell reported on its status pipe. Read without waiting: a failing process writes its
        message before it exits, and a process that is still alive must not stall the zygote."""
        raw = _read_available(shell.fds["status_r"]).decode(errors="replace")
        return BootFailure(*_split(raw, step)) if raw else BootFailure(step, default)

    def _discard(self, shell: _Shell, *, remove_cgroup: bool = True) -> None:
        """Kill a shell that will not boot anything and remove its cgroup."""
        _close_fds(shell.fds)
        if shell.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(shell.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(shell.pid, 0)
            shell.pid = 0
        if remove_cgroup:
            self._remove_cgroup(shell.cgroup)

    def _remove_cgroup(self, name: str) -> None:
        self.cgroups.kill(name)
        deadline = time.monotonic() + 5.0
        while not self.cgroups.remove(name) and time.monotonic() < deadline:
            time.sleep(0.002)  # off the boot path: killed processes are still exiting

    def spare_wanted(self) -> bool:
        """Whether to make a spare now: up to the base number, or up to the last burst's size (at most
        ``MAX_SPARES``) for ``BURST_MEMORY_S`` after it (a fork of 16 is often followed by another)."""
        if self.target > self.spares and time.monotonic() - self.burst_at > BURST_MEMORY_S:
            self.target = self.spares
        if self.per_sandbox and not self.spare_ranges:
            return False
        return len(self.ready) + len(self.making) < self.target

    def make_spare(self) -> _Shell | None:
        """Start one spare shell (default limits, primed at low priority: a claim writes the sandbox's own)."""
        base = self.spare_ranges.pop(0) if self.per_sandbox else self.id_base
        try:
            shell = self._make_shell(f"{SPARE_PREFIX}{os.getpid()}-{next(self._count)}", 1.0, 512, 1024,
                                     base, self.id_count, SPARE_NICE, spare=True)  # fmt: skip
        except (BootFailure, OSError):
            self.spares = self.target = 0  # this host refuses (e.g. no cgroup room): no spares from now on
            self._spare_range_back(base)
            return None
        self.making.append(shell)
        if self.per_sandbox and base != self.canonical_base:
            with contextlib.suppress(OSError):  # the template's idmapping, made ahead (else at the boot)
                self.idmappings.get(self.canonical_base, base)
        return shell

    def _spare_range_back(self, base: int) -> None:
        """A spare that never took a sandbox is gone (its processes reaped): its range may serve another."""
        if self.per_sandbox and base not in self.spare_ranges:
            self.spare_ranges.append(base)

    def _discard_spare(self, shell: _Shell) -> None:
        self._discard(shell)
        if shell.spare:
            self._spare_range_back(shell.id_base)

    def spare_progress(self, shell: _Shell) -> int | None:
        """A spare's holder or init wrote: the fd to wait on next, or None once it is ready (or discarded)."""
        try:
            if not self._progress(shell):
                return shell.fds["sync_r"]
        except (BootFailure, OSError):
            self.making.remove(shell)
            if shell.doomed:
                self._discard(shell)
            else:
                self._discard_spare(shell)
            return None
        self.making.remove(shell)
        if shell.doomed:  # its range serves a sandbox now; this shell never ran anything of a user's
            self._discard(shell)
        else:
            self.ready.append(shell)
        return None

    def reaped(self, pids: set[int]) -> None:
        """Drop spare shells that died while they waited."""
        for shell in [sh for sh in self.ready if sh.pid in pids]:
            self.ready.remove(shell)
            shell.pid = 0
            self._discard_spare(shell)

    def close(self) -> None:
        """At exit: spare shells go (their inits read EOF or are killed), with their cgroups."""
        for shell in [*self.ready, *self.making]:
            self._discard(shell)
        self.ready.clear()
        self.making.clear()
        self.idmappings.close()

    # -- boots -----------------------------------------------------------------------------------------
    def start(self, req: BootRequest) -> tuple[_Boot, dict[str, Any] | None]:
        """Claim a ready spare (or make a shell for this boot). Returns the boot and, if it already failed, the
        reply."""
        boot = _Boot(req, Path(req.run_dir) / AGENT_SOCKET)
        self.booting.append(boot)
        now = time.monotonic()
        self.recent = [t for t in self.recent if now - t < BURST_WINDOW_S] + [now]
        if self.spares and len(self.recent) > self.target:  # a burst (its boots need not overlap)
            self.target = min(MAX_SPARES, len(self.recent))
            self.burst_at = now
        try:
            spare = self._spare_for(req)
            if spare is not None:
                boot.shell = spare
                boot.cgroup = spare.cgroup  # until adopted: a failure removes the spare's
                dirs = self.cgroups.adopt(spare.cgroup, req.sandbox_id, spare.pid, req.cpu, req.memory_mb,
                                          req.pids, idle=req.nice > 0)  # fmt: skip
                spare.cgroup = boot.cgroup = req.sandbox_id
                boot.cgroups = {k: str(v) for k, v in dirs.items()}
                boot.lap("cgroup")
                boot.spare = True
                try:
                    self._send(boot)
                except OSError:  # the spare died after the check: a shell of its own
                    self._own_shell_instead(boot)
                return boot, None
            self._own_shell_instead(boot)
            return boot, None
        except BootFailure as exc:
            return boot, self._fail(boot, exc.step, exc.message)
        except Exception as exc:  # any failure is reported to the daemon
            return boot, self._fail(boot, boot.stage, str(exc))

    def _spare_for(self, req: BootRequest) -> _Shell | None:
        """The ready spare in the request's range, if any. Per-sandbox ranges: the range leaves the spare ranges
        (a spare of it still being made is dropped: the boot makes its own shell in that range), and the range
        the request lends for a next spare joins them."""
        if not self.per_sandbox:
            return self._live_spare() if (req.uid_base, req.id_count) == (self.id_base, self.id_count) else None
        if req.spare_uid_base and req.spare_uid_base not in self.spare_ranges:
            self.spare_ranges.append(req.spare_uid_base)
        if req.uid_base in self.spare_ranges:
            self.spare_ranges.remove(req.uid_base)
        for shell in self.making:  # its fd stays registered with serve()'s selector until it reports
            if shell.id_base == req.uid_base:
                shell.doomed = True
        spare = self._live_spare(req.uid_base)
        if spare is not None:
            spare.spare = False
        return spare

    def _live_spare(self, base: int | None = None) -> _Shell | None:
        """A ready spare (in range ``base``, if given) whose init still waits (one that died meanwhile is
        discarded)."""
        for shell in [sh for sh in self.ready if base is None or sh.id_base == base]:
            self.ready.remove(shell)
            try:
                gone = os.waitpid(shell.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                gone = True
            if not gone:
                return shell
            shell.pid = 0
            if base is None:
                self._discard_spare(shell)
            else:
                self._discard(shell)  # its range is the request's now
        return None

    def _own_shell_instead(self, boot: _Boot) -> None:
        """Make a shell for this boot alone (no spare, or the claimed one died before it took the request)."""
        req = boot.req
        if boot.shell is not None:
            self._discard(boot.shell, remove_cgroup=False)
            boot.shell = None
        if boot.cgroup:
            self._remove_cgroup(boot.cgroup)
            boot.cgroup = ""
        boot.spare = False
        boot.stage = "cgroup"
        boot.shell = self._make_shell(req.sandbox_id, req.cpu, req.memory_mb, req.pids, req.uid_base,
                                      req.id_count, req.nice)  # fmt: skip
        boot.cgroup = req.sandbox_id
        boot.cgroups = {k: str(v) for k, v in self.cgroups.dirs(req.sandbox_id).items()}
        boot.lap("shell")
        boot.stage = "shell"

    def _send(self, boot: _Boot) -> None:
        """Hand the boot request to the ready shell, with the agent's listening socket and log and the layers
        (opened here as host root: the sandbox uid need not reach them)."""
        boot.stage = "agent socket"
        req = boot.req
        assert boot.shell is not None
        with contextlib.suppress(FileNotFoundError):
            boot.sock_path.unlink()
        passed: list[int] = []
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            passed.append(listener.detach())
            _bind_listen(passed[0], boot.sock_path)
            passed.append(os.open(Path(req.run_dir) / AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC))
            boot.stage = "idmappings"
            bases = req.layer_bases or [req.uid_base] * len(req.layers)
            userns = {b: self.idmappings.get(b, req.uid_base) for b in set(bases) if b != req.uid_base}
            points = idmaps.mount_points(self.shell_dir, len(req.layers)) if userns else []
            boot.stage = "open layers"
            with self._in_mount_ns(boot.shell.pid):  # overlayfs takes only layers of the mounter's namespace
                for i, (layer, base) in enumerate(zip(req.layers, bases, strict=True)):
                    path = layer
                    if base != req.uid_base:  # owned in another range: seen through an idmapped mount
                        path = idmaps.mount_layer(layer, userns[base], points[i])
                    passed.append(_open_dir(path, "lower layer"))
                passed += [_open_dir(req.upper_dir, "upper dir"), _open_dir(req.work_dir, "work dir")]
            boot.stage = "request"
            with contextlib.suppress(OSError):  # the spare was primed at low priority
                os.setpriority(os.PRIO_PROCESS, boot.shell.pid, req.nice)
            with _borrowed(boot.shell.fds["ctl"]) as ctl:
                socket.send_fds(ctl, [json.dumps(dataclasses.asdict(req)).encode()], passed)
        finally:
            for fd in passed:
                with contextlib.suppress(OSError):
                    os.close(fd)
        boot.lap("request")
        boot.stage = "init"

    @contextlib.contextmanager
    def _in_mount_ns(self, pid: int) -> Iterator[None]:
        """Run the block in the mount namespace of ``pid`` (still as host root), then back in the host's."""
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, syscalls.CLONE_NEWNS)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            syscalls.setns(self.host_mnt_ns, syscalls.CLONE_NEWNS)

    def waiting_on(self, boot: _Boot) -> int:
        """The fd whose readability moves ``boot`` on."""
        assert boot.shell is not None
        return boot.shell.fds["ctl" if boot.stage == "init" else "sync_r"]

    def advance(self, boot: _Boot) -> dict[str, Any] | None:
        """Read what the boot's shell wrote; return the reply once the boot is over, else None."""
        try:
            return self._own_shell(boot) if boot.stage == "shell" else self._init_said(boot)
        except BootFailure as exc:
            return self._fail(boot, exc.step, exc.message)
        except Exception as exc:  # any failure is reported to the daemon
            return self._fail(boot, boot.stage, str(exc))

    def _own_shell(self, boot: _Boot) -> dict[str, Any] | None:
        assert boot.shell is not None
        stage = boot.shell.stage
        if self._progress(boot.shell):
            boot.lap("prime")
            self._send(boot)
        elif stage == "unshare":
            boot.lap("unshare")
        return None

    def _init_said(self, boot: _Boot) -> dict[str, Any] | None:
        """The init answers b"ok" once rooted (the agent serves then); EOF: it failed (see its status pipe)."""
        shell = boot.shell
        assert shell is not None
        with _borrowed(shell.fds["ctl"]) as ctl:
            try:
                answer = ctl.recv(64)
            except ConnectionResetError:  # it died with the request unread
                answer = b""
        if answer != b"ok":
            failure = self._died(shell, "init", "the sandbox process exited without a message")
            if boot.spare and failure.message.startswith("the sandbox process exited"):
                self._own_shell_instead(boot)  # a spare killed before it took the request: once more
                return None
            raise failure
        start_time = syscalls.pid_start_time(shell.pid)
        boot.lap("init")
        _close_fds(shell.fds)
        self.booting.remove(boot)
        return {
            "ok": True,
            "sandbox_id": boot.req.sandbox_id,
            "pid": shell.pid,
            "start_time": start_time,
            "cgroups": boot.cgroups,
            "phases": boot.phases,
        }

    def _fail(self, boot: _Boot, step: str, message: str) -> dict[str, Any]:
        if boot in self.booting:
            self.booting.remove(boot)
        if boot.shell is not None:
            self._discard(boot.shell, remove_cgroup=False)
        if boot.cgroup:
            self._remove_cgroup(boot.cgroup)
        with contextlib.suppress(FileNotFoundError):
            boot.sock_path.unlink()
        return {"ok": False, "sandbox_id": boot.req.sandbox_id, "step": step, "error": message}


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd`` that leaves it open (the fd stays owned by a shell's ``fds``)."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _open_dir(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} {path}: {exc.strerror}") from None


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


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _split(message: str, default_step: str) -> tuple[str, str]:
    step, sep, rest = message.partition(": ")
    return (step, rest) if sep else (default_step, message)


def _reap() -> set[int]:
    """Reap every exited child (sandbox inits are reparented to the zygote); return their pids."""
    reaped: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def serve(ctl: socket.socket, zygote: Zygote) -> None:
    """Answer requests until the daemon closes its end (then finish the boots in flight). Spare shells are made
    whenever no boot is in flight."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    queued: list[dict[str, Any]] = []
    in_flight = 0
    open_ctl = True

    def reply(msg_id: object, answer: dict[str, Any]) -> None:
        nonlocal in_flight
        in_flight -= 1
        answer["id"] = msg_id
        with contextlib.suppress(OSError):
            ctl.send(json.dumps(answer).encode())

    def watch(msg_id: object, boot: _Boot, answer: dict[str, Any] | None) -> None:
        if answer is not None:
            reply(msg_id, answer)
        else:
            sel.register(zygote.waiting_on(boot), selectors.EVENT_READ, ("boot", msg_id, boot))

    try:
        while open_ctl or in_flight:
            while queued and in_flight < MAX_IN_FLIGHT:
                msg = queued.pop(0)
                in_flight += 1
                watch(msg.get("id"), *zygote.start(BootRequest(**msg["req"])))
            while open_ctl and not in_flight and not queued and zygote.spare_wanted():
                shell = zygote.make_spare()
                if shell is not None:
                    sel.register(shell.fds["sync_r"], selectors.EVENT_READ, ("spare", None, shell))
            for key, _ in sel.select():
                if key.fileobj == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
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
                    elif msg.get("op") == "idmap":  # mappings a fork's children will need, made ahead
                        in_flight += 1
                        for src, dst in msg.get("pairs", []):
                            with contextlib.suppress(OSError):  # else made at the boot (and failing there)
                                zygote.idmappings.get(int(src), int(dst))
                        reply(msg.get("id"), {"ok": True})
                    elif msg.get("op") == "status":
                        in_flight += 1
                        reply(
                            msg.get("id"),
                            {
                                "ok": True,
                                "spares_ready": len(zygote.ready),
                                "spares_making": len(zygote.making),
                                "booting": len(zygote.booting),
                                "spare_ranges": sorted(
                                    [*zygote.spare_ranges, *(sh.id_base for sh in [*zygote.ready, *zygote.making])]
                                ),
                            },
                        )
                    else:
                        in_flight += 1
                        reply(msg.get("id"), {"ok": False, "step": "request",
                                              "error": f"unknown op {msg.get('op')!r}"})  # fmt: skip
                else:
                    kind, msg_id, obj = key.data
                    sel.unregister(key.fd)
                    if kind == "spare":
                        if (fd := zygote.spare_progress(obj)) is not None:
                            sel.register(fd, selectors.EVENT_READ, key.data)
                    else:
                        watch(msg_id, obj, zygote.advance(obj))
            zygote.reaped(_reap())
    finally:
        zygote.close()


# Modules the agent (or the stdlib code it calls) may import lazily; preloaded because the agent runs with an
# empty sys.path inside the sandbox.
_AGENT_PRELOAD = ("asyncio.unix_events", "encodings.idna", "encodings.latin_1", "grp", "pty", "tarfile", "tty")


def preload_agent() -> None:
    """Import the agent once here so every sandbox init becomes the agent by fork, without exec (~0 ms start)."""
    importlib.import_module("branchbox.agent.server")
    importlib.import_module("branchbox.backends.container.warmup")  # a primed agent warms itself up through a client
    for name in _AGENT_PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def make_shell_dir(path: Path) -> None:
    """The shells' cwd: searchable (not listable) by sandbox uids, with the empty mount points ROOT and STAGE."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o711)  # noqa: S103 - the init (uid 0 of its user namespace) looks up the mount points
    for name in (ROOT, STAGE):
        (path / name).mkdir(exist_ok=True)
        os.chmod(path / name, 0o755)  # noqa: S103 - an empty mount point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="branchbox-zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", default="branchbox")
    parser.add_argument("--shell-dir", type=Path, required=True, help="where shells mount their root (made here)")
    parser.add_argument("--spares", type=int, default=SPARES, help="shells kept ready for the next boots")
    parser.add_argument("--id-base", type=int, default=100000, help="host uid/gid of root in spare shells")
    parser.add_argument("--id-count", type=int, default=65536)
    parser.add_argument(
        "--spare-ranges",
        default=None,
        help="per-sandbox ranges: comma-separated host uids of root lent for spare shells",
    )
    parser.add_argument("--canonical-base", type=int, default=100000, help="the range template layers are owned in")
    args = parser.parse_args(argv)
    ctl = socket.socket(fileno=args.fd)
    ctl.set_inheritable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's ^C is not ours; EOF stops us
    maker: idmaps.Maker | None = None
    try:
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        if args.spare_ranges is not None:  # per-sandbox ranges: forked while this process is still small
            maker = idmaps.Maker()
        bpf = seccomp_policy.build_bpf()
        preload_agent()
        # Everything imported so far moves to the permanent generation: the collector of a forked sandbox init
        # never walks (and so never copies) the pages it shares with the zygote.
        gc.collect()
        gc.freeze()
        cgroups = cg_mod.detect(args.parent)
        cgroups.ensure_parents()
        make_shell_dir(args.shell_dir)
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
        spare_ranges = None if args.spare_ranges is None else [int(x) for x in args.spare_ranges.split(",") if x]
        keep = (ctl.fileno(),) if maker is None else (ctl.fileno(), maker.fd)
        zygote = Zygote(cgroups, bpf, keep, shell_dir=args.shell_dir, spares=args.spares,
                        id_base=args.id_base, id_count=args.id_count, spare_ranges=spare_ranges,
                        canonical_base=args.canonical_base, maker=maker)  # fmt: skip
        serve(ctl, zygote)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
