"""QEMU processes: the ``microvm`` command line, spawning with pre-bound sockets, liveness by pid + start time.

The daemon binds the QMP and agent sockets itself and hands them to QEMU as fds 3 and 4
(``-chardev socket,fd=N,server=on``): it can connect the moment QEMU is spawned, without waiting for a file to
appear. QEMU runs in its own session, so it outlives a daemon restart and is re-attached through the same sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import branchbox.backends.microvm.vsock as vsock
from branchbox.agent import wire
from branchbox.backends.process import wait_pid_exit
from branchbox.errors import BackendError

QEMU = "qemu-system-x86_64"
QMP_FD = 3
AGENT_FD = 4  # the agent's virtio-serial socket
VSOCK_FD = 4  # or /dev/vhost-vsock holding the VM's guest CID (agent over vsock)
HOLD_FD = 5  # the VM's uid claim (see jail.py): held by QEMU as long as it lives
# QEMU's own seccomp filter: no obsolete calls, no set*id, no fork/exec, no scheduler or resource-limit changes
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
ROOT_SERIAL = "bbroot"  # virtio-blk serials the guest's init looks for (guest/init.sh)
RUNTIME_SERIAL = "bbrt"
TCG_TB_MB = 256  # TCG's translation buffer (QEMU's default is 1 GiB, touched as it fills): bounded, it fits a cgroup


@dataclass(frozen=True, slots=True)
class Machine:
    """What must be equal between a saved VM and the QEMU that restores it."""

    vcpus: int
    memory_mb: int
    accel: str  # "kvm" | "tcg"
    kernel: Path
    initrd: Path
    cmdline: str
    agent: str = "serial"  # the agent channel: "serial" (virtio-serial port) | "vsock" (vhost-vsock-device)
    runtime: Path | None = None  # the agent's read-only runtime disk (runtime.py); None: the image's python3

    def key(self) -> str:
        """Names a memory template: a saved guest kernel keeps the command line it booted with."""
        boot = hashlib.sha256(self.cmdline.encode()).hexdigest()[:8]
        rt = f".rt{self.runtime.stem[:8]}" if self.runtime is not None else ""
        return f"{self.accel}-{self.vcpus}c-{self.memory_mb}m-{self.initrd.stem}.{boot}{rt}"


@dataclass(frozen=True, slots=True)
class Saved:
    """A saved VM: device state + RAM file + disk, and the machine it ran on."""

    dir: Path
    ram: Path
    machine: Machine

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"


@dataclass(frozen=True, slots=True)
class VmPaths:
    """One VM's files. ``dir`` is on the data disk, ``ram`` on tmpfs."""

    dir: Path
    ram: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"


def version(binary: str = QEMU) -> tuple[int, int]:
    """QEMU's (major, minor) from ``--version`` ((0, 0) when it cannot be read)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, check=False, timeout=30).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    found = re.search(r"version (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def command(m: Machine, paths: VmPaths, *, incoming: bool, vsock_cid: int | None = None) -> list[str]:
    """QEMU's argv. ``vsock_cid``: the guest CID claimed for a ``Machine(agent="vsock")`` (see vsock.py)."""
    cpu = ["-cpu", "host"] if m.accel == "kvm" else []
    accel = m.accel if m.accel == "kvm" else f"{m.accel},tb-size={TCG_TB_MB}"
    if m.agent == "vsock":
        if vsock_cid is None:
            raise ValueError("a vsock machine needs the guest CID claimed for it")
        channel = vsock.device_args(vsock_cid, VSOCK_FD)
    else:
        channel = [
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,fd={AGENT_FD},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=agent",
        ]  # fmt: skip
    argv = [
        QEMU,
        "-name", f"branchbox,process=branchbox-vm-{paths.dir.name}",
        "-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on",
        "-accel", accel, *cpu,
        "-sandbox", SECCOMP,
        "-smp", str(m.vcpus),
        "-m", f"{m.memory_mb}M",
        "-object", f"memory-backend-file,id=mem,size={m.memory_mb}M,mem-path={paths.ram},share=on",
        "-machine", "memory-backend=mem",
        "-kernel", str(m.kernel),
        "-initrd", str(m.initrd),
        "-append", m.cmdline,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{paths.console}",
        "-drive", f"id=root,file={paths.disk},format=qcow2,if=none,discard=unmap",
        *_disks(m),
        *channel,
        "-chardev", f"socket,id=qmp,fd={QMP_FD},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def _disks(m: Machine) -> list[str]:
    """The root disk's device and, with a runtime, its read-only disk. The guest's init finds each by its serial
    (virtio-mmio devices are not numbered in command-line order)."""
    if m.runtime is None:
        return ["-device", "virtio-blk-device,drive=root"]
    return [
        "-device", f"virtio-blk-device,drive=root,serial={ROOT_SERIAL}",
        "-drive", f"id=rt,file={m.runtime},format=raw,if=none,readonly=on",
        "-device", f"virtio-blk-device,drive=rt,serial={RUNTIME_SERIAL}",
    ]  # fmt: skip


def _bind(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with wire.short_unix_path(path) as p:
            sock.bind(p)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


def spawn(
    argv: Sequence[str],
    paths: VmPaths,
    *,
    nice: int = 0,
    vsock_fd: int | None = None,
    hold_fd: int | None = None,
    stdin_fd: int | None = None,
) -> int:
    """Start QEMU (or its launcher, ``argv``) in its own session with the QMP socket and the agent's channel (its
    virtio-serial socket, or ``vsock_fd`` from ``vsock.claim_cid``) in place, and ``hold_fd`` (the uid claim of
    jail.py) on ``HOLD_FD``, ``stdin_fd`` (default /dev/null) on 0; returns its pid."""
    qmp = _bind(paths.qmp)
    agent = _bind(paths.agent) if vsock_fd is None else None
    channel = (agent.fileno(), AGENT_FD) if agent is not None else (vsock_fd, VSOCK_FD)
    log = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, null if stdin_fd is None else stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, log, 1),
            (os.POSIX_SPAWN_DUP2, log, 2),
            (os.POSIX_SPAWN_DUP2, qmp.fileno(), QMP_FD),
            (os.POSIX_SPAWN_DUP2, *channel),
        ]
        if hold_fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, hold_fd, HOLD_FD))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            pid = os.posix_spawnp(argv[0], list(argv), env, file_actions=actions, setsid=True)
        except OSError as exc:
            raise BackendError(f"cannot start {argv[0]}: {exc}; install qemu-system-x86 (make apt)") from exc
    finally:
        for fd in (log, null):
            os.close(fd)
        qmp.close()
        if agent is not None:
            agent.close()
    if nice:
        set_nice(pid, nice)
    return pid


def set_nice(pid: int, nice: int) -> None:
    """Set the nice value of every thread of ``pid``: a QEMU started at nice 10 made its vCPU threads with it,
    and ``setpriority(PRIO_PROCESS, pid)`` changes the main thread only (Linux priorities are per thread)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (None: no such process, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    return pid > 0 and start_time(pid) == started


def reap(pid: int) -> None:
    """Collect the exit status if QEMU is our child (it is not after a daemon restart)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def wait_exit(pid: int, started: int) -> None:
    await wait_pid_exit(pid, lambda: alive(pid, started))
    reap(pid)


async def kill(pid: int, started: int) -> None:
    """SIGKILL QEMU (if it is still that process) and wait until it is gone."""
    if not alive(pid, started):
        reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    await wait_exit(pid, started)
