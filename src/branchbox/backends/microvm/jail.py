"""The jail every QEMU runs in: its own uid, a cgroup with memory and pids limits, a private mount namespace.

QEMU parses guest-controlled device state (virtio rings, a migration stream, qcow2 metadata); a bug there must not
be a way onto the host. So, as Firecracker's jailer does for its VMM, each QEMU process

- runs as a **uid/gid of its own** (``uid_base`` .. ``uid_base + uid_count - 1``, gid = uid, no supplementary
  groups, no capabilities, ``no_new_privs``). A uid is claimed with an exclusive ``flock`` on
  ``/run/branchbox/vm-ids/<uid>`` whose descriptor QEMU inherits (``HOLD_FD``): it is held exactly as long as
  that QEMU lives, across daemon restarts, and every daemon on the host claims from the same files, so two VMs
  never share a uid. The files it must write (its disk overlay, console log, RAM file) are chowned to it; the
  files it reads (kernel, initrd, the agent's runtime disk, the disk's backing chain) are made readable (they sit
  in 0700 dirs the uid cannot reach: it sees them only through its jail);
- runs in a **cgroup** of its own (``<cgroup_parent>/<vm id>``, v1 or v2 through the container backend's
  ``Cgroups``): memory = guest RAM + the TCG translation buffer + ``OVERHEAD_MB``, no swap, pids =
  ``PIDS_BASE`` + vCPUs (QEMU's block thread pool makes up to 64 threads); on v1 not the cpu hierarchy (see
  ``V1_CONTROLLERS``): VMs booted ahead of demand run at nice 10 (on v2, in idle cgroups);
- sees only its **own files**: a private mount namespace whose root is a read-only tmpfs holding ``/usr``, the
  loader cache, ``/dev/{null,zero,random,urandom}`` (``/dev/kvm`` as a node of its own under KVM) and its own
  files at their host paths; no data dir, no other VM, no ``/proc``;
- loads QEMU's seccomp filter: ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
  resourcecontrol=deny`` (``SECCOMP_ARGS``, in ``qemu.command``).

The launcher (``jailer.py``) is a separate program: the daemon is multi-threaded and never forks, so it
``posix_spawn``s ``python3 -I -S -B jailer.py``, which does the above in a fresh single-threaded process and
execs QEMU (same pid, same start time: liveness and re-attach are unchanged). Its spec comes on stdin
(:meth:`Jail.go`) once the VM's files exist, so a restore starts it (:meth:`Jail.start`) before copying RAM and
disk and the interpreter's start (~11 ms quiet) is off the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import marshal
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import branchbox.backends.container.cgroups as cg_mod
import branchbox.backends.microvm.qemu as qemu
import branchbox.backends.microvm.tplcache as tplcache
from branchbox.errors import BackendError

log = logging.getLogger("branchbox.microvm")

LAUNCHER = Path(__file__).with_name("jailer.py")
LOCK_DIR = Path("/run/branchbox/vm-ids")
OVERHEAD_MB = 256  # QEMU's heap, thread stacks, block caches, page cache it reads (measured: docs/microvm.md)
PIDS_BASE = 96
UID_BASE = 2_000_000_000  # far above the container backend's ranges (100000 + 65536 per range)
UID_COUNT = 65536
ROOT_DIR = "jail"  # the empty directory in the VM's run dir that the launcher mounts its root tmpfs on
# cgroup v1 hierarchies a VM joins: not cpu, whose group scheduling would make all of a daemon's VMs one entity
# weighing as much as a single task of the cpu cgroup the daemon runs in (the root here); under load that starved
# TCG guests (agent connects of fork children went from tens of ms to 8 s). Pause is QMP's stop, not the freezer.
V1_CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True, slots=True)
class JailConfig:
    enabled: bool = True  # False: QEMU runs as the daemon's user, in its cgroup and mount namespace (debugging)
    uid_base: int = UID_BASE
    uid_count: int = UID_COUNT
    cgroup_parent: str = "branchbox-vm"
    lock_dir: Path = LOCK_DIR


def memory_limit_mb(m: qemu.Machine) -> int:
    tb = qemu.TCG_TB_MB if m.accel == "tcg" else 0
    return m.memory_mb + tb + OVERHEAD_MB


def pids_limit(m: qemu.Machine) -> int:
    return PIDS_BASE + m.vcpus


def disk_chain(top: Path) -> list[Path]:
    """``top`` and every backing file below it (absolute paths, as QEMU opens them)."""
    chain = [top]
    for _ in range(tplcache.MAX_CHAIN):
        nxt = tplcache.backing_file(chain[-1])
        if nxt is None:
            break
        chain.append(nxt)
    return chain


def _readable(path: Path) -> None:
    """Let the VM's uid read ``path`` (read-only files in 0700 dirs: nobody else reaches them)."""
    mode = os.stat(path).st_mode & 0o7777
    if mode & 0o004 == 0:
        os.chmod(path, mode | 0o444)


def _own(path: Path, uid: int, *, create: bool = False) -> None:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchown(fd, uid, uid)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Launch:
    """A QEMU being started (see :meth:`Jail.start`)."""

    vmid: str
    machine: qemu.Machine
    paths: qemu.VmPaths
    nice: int = 0
    vsock_fd: int | None = None  # until QEMU (or its launcher) has its own copy
    vsock_cid: int | None = None
    pid: int | None = None  # the launcher's, which becomes QEMU's (None: not jailed, go() spawns QEMU)
    uid: int = 0
    go_fd: int = -1  # the launcher's stdin: its spec, then EOF

    def close(self) -> None:
        """Close this side's copy of the vsock descriptor."""
        if self.vsock_fd is not None:
            os.close(self.vsock_fd)
            self.vsock_fd = None


class Jail:
    """Claims uids, makes cgroups and the launcher's argv for the QEMUs of one backend."""

    def __init__(self, config: JailConfig) -> None:
        self.config = config
        self._cg: cg_mod.Cgroups | None = None
        self.active = config.enabled and os.geteuid() == 0
        if config.enabled and not self.active:
            log.warning("QEMU runs as this daemon's user (uid %d), in its cgroup and mount namespace: only root "
                        "can give each VM a uid, a cgroup and a mount namespace of its own", os.geteuid())  # fmt: skip

    def cgroups(self) -> cg_mod.Cgroups:
        if self._cg is None:
            cg = cg_mod.detect(self.config.cgroup_parent)
            if isinstance(cg, cg_mod.CgroupsV1):  # see V1_CONTROLLERS
                cg = cg_mod.CgroupsV1({k: v for k, v in cg.parents.items() if k in V1_CONTROLLERS})
            cg.ensure_parents()
            self._cg = cg
        return self._cg

    def claim_id(self) -> tuple[int, int]:
        """A free uid (= gid) and the locked descriptor that holds it (QEMU inherits it)."""
        self.config.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        count = self.config.uid_count
        start = secrets.randbelow(count)
        for i in range(count):
            uid = self.config.uid_base + (start + i) % count
            fd = os.open(self.config.lock_dir / str(uid), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return uid, fd
        raise OSError(errno.EAGAIN, f"all {count} VM uids from {self.config.uid_base} are in use")

    def start(
        self,
        vmid: str,
        m: qemu.Machine,
        paths: qemu.VmPaths,
        *,
        nice: int = 0,
        vsock_fd: int | None = None,
        vsock_cid: int | None = None,
    ) -> Launch:
        """Start the launcher of ``vmid`` (its run dir exists); it waits for :meth:`go`, so its interpreter starts
        while the VM's disk and RAM are made. Takes ``vsock_fd`` (closed here or by go/abort)."""
        launch = Launch(vmid, m, paths, nice=nice, vsock_fd=vsock_fd, vsock_cid=vsock_cid)
        if not self.active:
            return launch  # go() spawns QEMU itself
        cg = self.cgroups()
        try:
            launch.uid, hold = self.claim_id()
        except BaseException:
            launch.close()
            raise
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        try:
            cg.create(vmid, 0, memory_limit_mb(m), pids_limit(m), idle=nice > 0)
            try:
                argv = [sys.executable, "-I", "-S", "-B", str(LAUNCHER)]
                launch.pid = qemu.spawn(argv, paths, nice=nice, vsock_fd=vsock_fd, hold_fd=hold, stdin_fd=go_r)
            except BaseException:
                with contextlib.suppress(OSError):
                    cg.remove(vmid)
                raise
            launch.go_fd, go_w = go_w, -1
        finally:
            for fd in (go_r, go_w, hold):  # the launcher, then QEMU, holds the uid through its own copy
                if fd >= 0:
                    os.close(fd)
            launch.close()
        return launch

    def go(self, launch: Launch, argv: Sequence[str]) -> int:
        """Send the launcher its spec: QEMU's ``argv`` and the VM's files (which exist now). Returns QEMU's pid."""
        m, paths = launch.machine, launch.paths
        if launch.pid is None:
            try:
                return qemu.spawn(argv, paths, nice=launch.nice, vsock_fd=launch.vsock_fd)
            finally:
                launch.close()
        try:
            chain = disk_chain(paths.disk)
            ro = [m.kernel, m.initrd, *([m.runtime] if m.runtime is not None else []), *chain[1:]]
            for f in ro:
                _readable(f)
            _own(paths.disk, launch.uid)
            _own(paths.console, launch.uid, create=True)
            _own(paths.ram, launch.uid, create=True)
            root = paths.dir / ROOT_DIR
            root.mkdir(mode=0o700, exist_ok=True)
            spec = {
                "cgroups": [str(d / "cgroup.procs") for d in self.cgroups().dirs(launch.vmid).values()],
                "root": str(root),
                "uid": launch.uid,
                "gid": launch.uid,
                "groups": [],
                "kvm": _kvm_node() if m.accel == "kvm" else None,
                "ro": [str(f) for f in ro],
                "rw": [str(paths.disk), str(paths.console), str(paths.ram)],
                "argv": [_binary(argv[0]), *argv[1:]],
                "env": {"PATH": "/usr/bin:/bin"},
            }
            data = memoryview(marshal.dumps(spec))
            while data:
                data = data[os.write(launch.go_fd, data) :]
            os.close(launch.go_fd)
            launch.go_fd = -1
        except BaseException:
            self.abort(launch)
            raise
        return launch.pid

    def abort(self, launch: Launch) -> None:
        """Stop a launcher that will not get its spec (the VM's files could not be made) and drop its cgroup."""
        launch.close()
        if launch.go_fd >= 0:
            os.close(launch.go_fd)
            launch.go_fd = -1
        if launch.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(launch.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(launch.pid, 0)
            with contextlib.suppress(OSError):
                self.cgroups().remove(launch.vmid)

    def spawn(
        self,
        vmid: str,
        argv: Sequence[str],
        m: qemu.Machine,
        paths: qemu.VmPaths,
        *,
        nice: int = 0,
        vsock_fd: int | None = None,
    ) -> int:
        """:meth:`start` and :meth:`go` at once (the VM's files exist). Returns QEMU's pid."""
        return self.go(self.start(vmid, m, paths, nice=nice, vsock_fd=vsock_fd), argv)

    def foreground(self, vmid: str) -> None:
        if self.active:
            with contextlib.suppress(OSError):
                self.cgroups().set_idle(vmid, idle=False)

    async def release(self, vmid: str) -> None:
        """Remove the cgroup of ``vmid`` once its QEMU is gone (killing whatever is still in it)."""
        if not self.active:
            return
        cg = self.cgroups()
        for _ in range(200):
            with contextlib.suppress(OSError):
                cg.kill(vmid)
                if cg.remove(vmid):
                    return
            await asyncio.sleep(0.01)  # killed processes leave their cgroup a moment after SIGKILL

    def vm_ids(self) -> set[str]:
        """The VMs that have a cgroup under this backend's parent."""
        return self.cgroups().list_ids() if self.active else set()

    def close(self) -> None:
        """Remove the parent cgroups when no VM is left in them."""
        if self._cg is not None:
            for parent in self._cg.parents.values():
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _binary(name: str) -> str:
    """The absolute path of ``name`` (the jail's PATH is not the host's)."""
    found = name if os.path.isabs(name) else shutil.which(name)
    if found is None:
        raise BackendError(f"{name} is not installed: install qemu-system-x86 (make apt)")
    return found


def _kvm_node() -> list[int]:
    st = os.stat("/dev/kvm")
    return [os.major(st.st_rdev), os.minor(st.st_rdev)]
