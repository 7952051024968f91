"""QEMU's launcher: puts itself in a VM's jail, then execs QEMU. Stdlib only, run as its own program.

``python3 -I -S -B jailer.py``, spawned by the daemon with the VM's sockets and its uid claim already on their fds,
reads its spec from stdin (a ``marshal``-ed dict, see ``branchbox.backends.microvm.jail``; marshal is built in,
where ``json`` would import ``re``, ~3x this program's imports) once the daemon has made the VM's files: the
interpreter starts meanwhile. EOF without a spec: the daemon gave up, exit. Then, as Firecracker's jailer does:

1. join the VM's cgroups (every hierarchy's ``cgroup.procs``), so QEMU's memory and threads count there from its
   first allocation;
2. ``unshare(CLONE_NEWNS)``, make every mount private, mount a small tmpfs on ``root`` (an empty directory), and
   bind into it only what QEMU opens: ``/usr`` (its binary, libraries, firmware), the loader cache, a few device
   nodes, and the VM's own files at their host paths (kernel, initrd, disk and its backing chain read-only; the
   top disk, console log and RAM file writable), every one ``nosuid``, ``nodev`` where it can be;
3. ``pivot_root`` into it, drop the old root, make the tmpfs read-only;
4. drop to the VM's uid/gid with no supplementary groups (the capabilities go with uid 0), ``no_new_privs``;
5. exec QEMU (which loads its own seccomp filter from ``-sandbox on,...``).

Any failure is one line on stderr (QEMU's log) and exit status 127: nothing runs half-jailed.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import stat
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            None if src is None else src.encode(),
            dst.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount {src or fstype} on {dst}",
    )


def _mount_point(root: str, path: str, *, directory: bool) -> str:
    """Make ``root + path`` (its parents 0755), an empty directory or file to mount on."""
    dst = root + path
    parent = os.path.dirname(dst)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if directory:
        os.makedirs(dst, mode=0o755, exist_ok=True)
    elif not os.path.lexists(dst):
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return dst


def _bind(root: str, path: str, flags: int) -> None:
    """Bind the host's ``path`` at the same path in the jail, with ``flags`` (MS_RDONLY, MS_NOSUID, ...)."""
    st = os.stat(path)
    dst = _mount_point(root, path, directory=stat.S_ISDIR(st.st_mode))
    _mount(path, dst, None, MS_BIND)
    _mount(None, dst, None, MS_BIND | MS_REMOUNT | flags)  # a bind takes new flags only on a remount


def _link_or_bind(root: str, path: str) -> None:
    """``/lib`` and friends: the same symlink when the host has one (merged /usr), else a read-only bind."""
    if os.path.islink(path):
        os.makedirs(os.path.dirname(root + path), mode=0o755, exist_ok=True)
        os.symlink(os.readlink(path), root + path)
    elif os.path.isdir(path):
        _bind(root, path, MS_RDONLY | MS_NOSUID | MS_NODEV)


def build(spec: dict[str, Any]) -> None:
    """Steps 2 and 3 (see the module docstring): the private mount namespace and its root."""
    root = str(spec["root"])
    kvm = spec.get("kvm")
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host's mounts
    root_flags = MS_NOSUID | (0 if kvm else MS_NODEV)
    _mount("tmpfs", root, "tmpfs", root_flags, "mode=0755,size=1m,nr_inodes=512")
    _bind(root, "/usr", MS_RDONLY | MS_NOSUID | MS_NODEV)
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        _link_or_bind(root, top)
    if os.path.exists("/etc/ld.so.cache"):
        _bind(root, "/etc/ld.so.cache", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
        _bind(root, dev, MS_NOSUID | MS_NOEXEC)
    uid, gid = int(spec["uid"]), int(spec["gid"])
    if isinstance(kvm, list):  # a node of its own: the host's /dev/kvm stays root's
        dst = _mount_point(root, "/dev", directory=True) + "/kvm"
        os.mknod(dst, 0o600 | stat.S_IFCHR, os.makedev(int(kvm[0]), int(kvm[1])))
        os.chown(dst, uid, gid)
    for path in spec["ro"]:
        _bind(root, str(path), MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in spec["rw"]:
        _bind(root, str(path), MS_NOSUID | MS_NODEV | MS_NOEXEC)
    old = root + "/.old"
    os.mkdir(old, 0o700)
    _check(_libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount /.old")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | root_flags)


def read_spec() -> dict[str, Any] | None:
    """The spec on stdin (up to EOF); stdin becomes /dev/null for QEMU."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if not chunks:
        return None
    return marshal.loads(b"".join(chunks))  # type: ignore[no-any-return]  # noqa: S302 - from the daemon (root)


def main() -> None:
    step = "spec"
    try:
        spec = read_spec()
    except (OSError, ValueError, EOFError) as exc:
        sys.stderr.write(f"branchbox jailer: {step}: {exc}\n")
        os._exit(127)
    if spec is None:
        os._exit(127)  # the daemon gave up on this VM before it was made
    step = "cgroup"
    try:
        for procs in spec["cgroups"]:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        if spec.get("root"):
            step = "mount namespace"
            build(spec)
        step = "credentials"
        if "uid" in spec:
            os.setgroups([int(g) for g in spec.get("groups", [])])
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        step = "exec"
        os.execve(spec["argv"][0], spec["argv"], spec["env"])  # noqa: S606 - QEMU's argv, no shell wanted
    except (OSError, KeyError, ValueError, TypeError) as exc:
        sys.stderr.write(f"branchbox jailer: {step}: {exc}\n")
        sys.stderr.flush()
        os._exit(127)


if __name__ == "__main__":
    main()
