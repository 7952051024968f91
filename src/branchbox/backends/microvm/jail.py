"""The jail every QEMU runs in: its own uid, a cgroup with memory and pids limits, a private mount namespace.

QEMU parses guest-controlled device state (virtio rings, a migration stream, qcow2 metadata); a bug there must not
be a way onto the host. So, as Firecracker's jailer does for its VMM, each QEMU process

- runs as a **uid/gid of its own** (``uid_base`` .. ``uid_base + uid_count - 1``, gid = uid, no supplementary
  groups, no capabilities, ``no_new_privs``). A uid is claimed with an exclusive ``flock`` on
  ``/run/branchbox/vm-ids/<uid>`` whose descriptor QEMU inherits (``HOLD_FD``): it is held exactly as long as
  that QEMU lives, across daemon restarts, and every daemon on the host claims from the same files, so two VMs
  never share a uid. The files it must write (its disk overlay, console log, RAM file) are chowned to it; the
  files it reads (kernel, initrd, the disk's backing chain) are made readable (they sit in 0700 dirs the uid
  cannot reach: it sees them only through its jail);
- runs in a **cgroup** of its own (``<cgroup_parent>/<vm id>``, v1 or v2 through the container backend's
  ``Cgroups``): memory = guest RAM + the TCG translation buffer + ``OVERHEAD_MB``, no swap, pids =
  ``PIDS_BASE`` + vCPUs (QEMU's block thread pool makes up to 64 threads). VMs booted ahead of demand run idle;
- sees only its **own files**: a private mount namespace whose root is a read-only tmpfs holding ``/usr``, the
  loader cache, ``/dev/{null,zero,random,urandom}`` (``/dev/kvm`` as a node of its own under KVM) and its own
  files at their host paths; no data dir, no other VM, no ``/proc``;
- loads QEMU's seccomp filter: ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
  resourcecontrol=deny`` (``SECCOMP_ARGS``, in ``qemu.command``).

The launcher (``jailer.py``) is a separate program: the daemon is multi-threaded and never forks, so it
``posix_spawn``s ``python3 -I -S -B jailer.py SPEC``, which does the above in a fresh single-threaded process and
execs QEMU (same pid, same start time: liveness and re-attach are unchanged).
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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from branchbox.backends.container import cgroups as cg_mod
from branchbox.backends.microvm import qemu, tplcache
from branchbox.errors import BackendError

log = logging.getLogger("branchbox.microvm")

LAUNCHER = Path(__file__).with_name("jailer.py")
LOCK_DIR = Path("/run/branchbox/vm-ids")
OVERHEAD_MB = 256  # QEMU's heap, thread stacks, block caches, page cache it reads (measured: docs/microvm.md)
PIDS_BASE = 96
UID_BASE = 2_000_000_000  # far above the container backend's ranges (100000 + 65536 per range)
UID_COUNT = 65536
ROOT_DIR = "jail"  # the empty directory in the VM's run dir that the launcher mounts its root tmpfs on


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
        """Start QEMU (``argv``) in the jail of ``vmid``; its disk overlay exists. Returns QEMU's pid."""
        if not self.active:
            return qemu.spawn(argv, paths, nice=nice, vsock_fd=vsock_fd)
        binary = _binary(argv[0])
        cg = self.cgroups()
        uid, hold = self.claim_id()
        try:
            cg.create(vmid, 0, memory_limit_mb(m), pids_limit(m), idle=nice > 0)
            try:
                chain = disk_chain(paths.disk)
                for f in (m.kernel, m.initrd, *chain[1:]):
                    _readable(f)
                _own(paths.disk, uid)
                _own(paths.console, uid, create=True)
                _own(paths.ram, uid, create=True)
                root = paths.dir / ROOT_DIR
                root.mkdir(mode=0o700, exist_ok=True)
                spec = {
                    "cgroups": [str(d / "cgroup.procs") for d in cg.dirs(vmid).values()],
                    "root": str(root),
                    "uid": uid,
                    "gid": uid,
                    "groups": [],
                    "kvm": _kvm_node() if m.accel == "kvm" else None,
                    "ro": [str(m.kernel), str(m.initrd), *map(str, chain[1:])],
                    "rw": [str(paths.disk), str(paths.console), str(paths.ram)],
                    "argv": [binary, *argv[1:]],
                    "env": {"PATH": "/usr/bin:/bin"},
                }
                launcher = [sys.executable, "-I", "-S", "-B", str(LAUNCHER), marshal.dumps(spec).hex()]
                return qemu.spawn(launcher, paths, nice=nice, vsock_fd=vsock_fd, hold_fd=hold)
            except BaseException:
                with contextlib.suppress(OSError):
                    cg.remove(vmid)
                raise
        finally:
            os.close(hold)  # QEMU holds the uid through its own copy

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
