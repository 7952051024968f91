"""Code that runs in the forked children of the zygote: the namespace holder and the sandbox init.

Process chain for one sandbox (all forks of the single-threaded zygote)::

    zygote ── fork ──> holder: join cgroups, unshare namespaces, wait for the id maps, make mounts private,
                       become uid 0 of the new user namespace, fork, report the init's pid, exit
                       └── fork ──> init (pid 1 of the new pid namespace): /proc, /dev and /sys made on a
                                    private staging tmpfs, lo up, the agent's event loop started: now a primed
                                    *shell* (spares wait here, made ahead of demand). On a boot request: the
                                    overlay root from the layers the zygote opened, the staged mounts moved
                                    into it, /tmp (a directory of the root, or a tmpfs), pivot_root, hostname,
                                    seccomp, capabilities (no_new_privs only in the shared uid range), then
                                    the agent serves (no exec: it is preloaded in the zygote)

Errors go to the status pipe as ``"<step>: <message>"``; the init acknowledges a boot with ``b"ok"`` on its
control socket. Nothing here returns: every path ends in ``os._exit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

import branchbox.backends.container.caps as caps
import branchbox.backends.container.devices as devices
import branchbox.backends.container.syscalls as syscalls
from branchbox.backends.container.cgroups import Cgroups

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL_DIR = "shell"  # in the backend's run root: the init's cwd, holding the two mount points below
ROOT = "root"  # the overlay root is mounted here (in the shell's own mount namespace)
STAGE = "stage"  # a tmpfs holding the staged kernel filesystems until the root exists
STAGED = ("proc", "dev", "sys")
TMP = "tmp"
MAX_PASSED_FDS = 250  # descriptors with a boot request (SCM_RIGHTS carries at most 253)


@dataclass(frozen=True, slots=True)
class BootRequest:
    """One boot, as the zygote receives it (JSON)."""

    sandbox_id: str
    layers: list[str]
    upper_dir: str
    work_dir: str
    run_dir: str
    hostname: str
    cpu: float
    memory_mb: int
    pids: int
    uid_base: int
    id_count: int
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    network: bool = False
    nice: int = 0  # niceness of the boot and of the idle agent (raised for warm pool refills)
    tmp_tmpfs_mb: int = 0  # 0: /tmp is a directory of the overlay root (snapshots capture it); else a tmpfs
    layer_bases: list[int] = field(default_factory=list)  # range each layer is owned in (empty: uid_base's)
    spare_uid_base: int = 0  # a range the daemon lends the zygote for its next spare shell (0: none)
    # setuid bits inert: kept while sandboxes share a uid range; with a range of its own a setuid binary reaches
    # only the sandbox's own ids (sudo works, as in Docker's default)
    no_new_privs: bool = True


@dataclass(frozen=True, slots=True)
class HolderFds:
    """Pipes the zygote hands to a holder (all CLOEXEC)."""

    status_w: int  # "<step>: <message>" on failure
    sync_w: int  # holder -> zygote: b"u" after unshare, then "<init pid>\n"; init: b"r" once primed
    go_r: int  # zygote -> holder: one byte once the id maps are written
    ctl: int  # SOCK_SEQPACKET: the boot request (JSON) with its descriptors; the init answers b"ok"
    close: tuple[int, ...]  # zygote-only fds to close in the child
    shell_dir: str = ""  # the init's cwd (see SHELL_DIR)


def _fail(status_w: int, step: str, exc: BaseException) -> None:
    msg = f"{step}: {exc}".encode(errors="replace")[:4000]
    with contextlib.suppress(OSError):
        os.write(status_w, msg)
    os._exit(1)


def run_holder(
    cgroup: str, fds: HolderFds, cgroups: Cgroups, seccomp_bpf: bytes, *, nice: int = 0, warm_up: bool = True
) -> None:
    """Body of the holder process (never returns).

    In the cgroup ``cgroup`` and new namespaces, once its id maps are written: mounts private, cwd the zygote's
    shell directory (opened while still host root: the sandbox uid need not reach it), uid 0 inside, then fork
    the init, report its pid on ``sync_w`` and exit."""
    step = "holder"
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        for fd in fds.close:
            with contextlib.suppress(OSError):
                os.close(fd)
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)  # a shell never outlives the zygote
        step = "join cgroups"
        cgroups.join(cgroup)
        step = "setgroups"
        os.setgroups([])
        step = "unshare"
        syscalls.unshare(syscalls.SANDBOX_NAMESPACES)
        os.write(fds.sync_w, b"u")
        step = "wait for id maps"
        if os.read(fds.go_r, 1) != b"g":
            os._exit(1)
        os.close(fds.go_r)
        step = "make mounts slaves"
        # Slaves: the host's later mounts and unmounts still reach a waiting shell (it pins no host filesystem
        # and sees a data dir mounted after it was made); nothing goes back. The root made at the boot request
        # and everything under it are private.
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_SLAVE)
        os.chdir(fds.shell_dir)
        step = "priority"
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        step = "setuid"
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        step = "fork init"
        pid = os.fork()
        if pid == 0:
            _run_init(fds, seccomp_bpf, warm_up=warm_up)
        os.write(fds.sync_w, f"{pid}\n".encode())
        os._exit(0)
    except BaseException as exc:  # reported to the zygote, then exit
        _fail(fds.status_w, step, exc)


def _expect_fds(passed: list[int], n: int) -> None:
    if len(passed) != n:
        raise OSError(f"expected {n} descriptors with the request, got {len(passed)}")


def _fdpath(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _close_other_fds(keep: set[int]) -> None:
    """Close every descriptor inherited from the zygote but ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _run_init(fds: HolderFds, seccomp_bpf: bytes, *, warm_up: bool) -> None:
    """Prime: stage the sandbox's kernel filesystems, then run the agent's loop until a boot request comes.
    ``warm_up``: run one exec through the agent first (a spare, made ahead of demand)."""
    step = "init"
    try:
        os.setsid()
        _close_other_fds({0, 1, 2, fds.status_w, fds.sync_w, fds.ctl})
        step = "stage mounts"
        syscalls.mount("tmpfs", STAGE, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=755,size=16k")
        os.chdir(STAGE)
        _mkdirs(*STAGED)
        nosuid_nodev_noexec = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        step = "mount /proc"
        syscalls.mount("proc", "proc", "proc", nosuid_nodev_noexec)
        step = "mount /dev"
        _setup_dev()
        step = "mount /sys"
        try:
            syscalls.mount("sysfs", "sys", "sysfs", nosuid_nodev_noexec | syscalls.MS_RDONLY)
        except OSError:
            # Not allowed (e.g. no own network namespace): an empty read-only tmpfs instead.
            syscalls.mount("tmpfs", "sys", "tmpfs", nosuid_nodev_noexec | syscalls.MS_RDONLY, "size=0")
        step = "mask /proc"
        _mask_paths()
        os.chdir("..")
        step = "loopback up"
        syscalls.interface_up("lo")
        step = "capability bounding set"
        caps.limit_bounding_set()
        step = "agent"
        import branchbox.backends.container.warmup as warmup  # noqa: PLC0415 - preloaded likewise
        from branchbox.agent import server  # noqa: PLC0415 - in sys.modules already (preloaded by the zygote)

        syscalls.scrub_process_image(b"branchbox-agent")
        # Not dumpable: the sandbox's root (no CAP_SYS_PTRACE) cannot ptrace or read the memory this process
        # shares with the zygote. Children the agent execs are dumpable again (exec resets it).
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        os.environ.clear()
        os.environ["PATH"] = DEFAULT_PATH
        # Imports can no longer load files: nothing the sandbox writes can ever run inside the agent's process.
        sys.path[:] = []
        sys.argv[:] = ["branchbox-agent"]
    except BaseException as exc:  # reported to the zygote, then exit
        _fail(fds.status_w, step, exc)

    def ready() -> None:
        os.write(fds.sync_w, b"r")
        os.close(fds.sync_w)

    def claim(raw: bytes, passed: list[int]) -> tuple[int, dict[str, str], str]:
        return _claim(raw, passed, fds, seccomp_bpf)

    server.run_primed(
        fds.ctl, claim, max_fds=MAX_PASSED_FDS, ready=ready, warm_up=warmup.exec_true if warm_up else None
    )
    os._exit(0)


def _claim(raw: bytes, passed: list[int], fds: HolderFds, seccomp_bpf: bytes) -> tuple[int, dict[str, str], str]:
    """Root the primed shell on the request's layers. Returns the agent's listening fd, env and workdir; on
    failure reports to the zygote and exits. ``passed``: listening socket, log, the lower layers, upper, work."""
    step = "boot request"
    try:
        req = BootRequest(**json.loads(raw))
        _expect_fds(passed, len(req.layers) + 4)
        listen, log, *dirs = passed
        *layer_fds, upper_fd, work_fd = dirs
        step = "mount overlay"
        lower = ":".join(_fdpath(fd) for fd in layer_fds)
        opts = f"lowerdir={lower},upperdir={_fdpath(upper_fd)},workdir={_fdpath(work_fd)},userxattr"
        syscalls.mount("overlay", ROOT, "overlay", 0, opts)
        for fd in dirs:
            os.close(fd)
        step = "move staged mounts"
        os.chdir(ROOT)
        _mkdirs(*STAGED)
        for name in STAGED:
            syscalls.mount(f"../{STAGE}/{name}", name, None, syscalls.MS_MOVE)
        step = "/tmp"
        _setup_tmp(req.tmp_tmpfs_mb)
        step = "pivot_root"
        syscalls.pivot_root(".", ".")
        syscalls.umount2(".", syscalls.MNT_DETACH)
        os.chdir("/")
        step = "sethostname"
        syscalls.sethostname(req.hostname)
        step = "stdio"
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        if req.no_new_privs:
            step = "capabilities"
            caps.drop_to_default_caps()
            step = "no_new_privs"
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            step = "seccomp"
            syscalls.load_seccomp_bpf(seccomp_bpf)
        else:  # a filter without no_new_privs needs CAP_SYS_ADMIN (of this user namespace): load it first
            step = "seccomp"
            syscalls.load_seccomp_bpf(seccomp_bpf)
            step = "capabilities"
            caps.drop_to_default_caps()
        os.close(fds.status_w)
        os.set_inheritable(listen, False)
        return listen, req.env, req.workdir
    except BaseException as exc:  # reported to the zygote, then exit
        _fail(fds.status_w, step, exc)
        raise  # unreachable: _fail exits


def _mkdirs(*names: str) -> None:
    for name in names:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755)


def _setup_tmp(tmpfs_mb: int) -> None:
    """/tmp of the root (the cwd): by default a plain directory of the overlay, so snapshots, forks, restores and
    resets treat it as every other file; made (mode 1777) when the layers have none. With ``tmpfs_mb`` a
    memory-backed tmpfs of that size (charged to the sandbox's memory cgroup) instead. A /tmp that is not a
    directory (the sandbox made it a symlink, say) is left alone: it is the sandbox's own file, and nothing may be
    mounted through it."""
    try:
        st = os.lstat(TMP)
    except FileNotFoundError:
        os.mkdir(TMP, 0o1777)
        os.chmod(TMP, 0o1777)  # noqa: S103 - /tmp is world-writable and sticky; the umask may have cleared bits
        st = os.lstat(TMP)
    if tmpfs_mb and stat.S_ISDIR(st.st_mode):
        opts = f"mode=1777,size={tmpfs_mb}m"
        syscalls.mount("tmpfs", TMP, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, opts)


def _setup_dev() -> None:
    syscalls.mount("tmpfs", "dev", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_STRICTATIME, "mode=755,size=65536k")
    for name in devices.DEVICES:
        path = f"dev/{name}"
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        syscalls.mount(f"/dev/{name}", path, None, syscalls.MS_BIND)
    os.mkdir("dev/pts", 0o755)
    syscalls.mount(
        "devpts",
        "dev/pts",
        "devpts",
        syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    os.mkdir("dev/shm", 0o1777)
    syscalls.mount("shm", "dev/shm", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777,size=65536k")
    for name, target in devices.DEV_LINKS.items():
        os.symlink(target, f"dev/{name}")


def _mask_paths() -> None:
    for path in devices.MASKED_PATHS:
        rel = path.lstrip("/")
        try:
            st = os.lstat(rel)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            syscalls.mount("tmpfs", rel, "tmpfs", syscalls.MS_RDONLY, "size=0")
        else:
            syscalls.mount("dev/null", rel, None, syscalls.MS_BIND)
    for path in devices.READONLY_PATHS:
        rel = path.lstrip("/")
        if not os.path.exists(rel):
            continue
        syscalls.mount(rel, rel, None, syscalls.MS_BIND | syscalls.MS_REC)
        _remount_ro(rel)


_ST_TO_MS = (
    (os.ST_NOSUID, syscalls.MS_NOSUID),
    (os.ST_NODEV, syscalls.MS_NODEV),
    (os.ST_NOEXEC, syscalls.MS_NOEXEC),
    (os.ST_NOATIME, syscalls.MS_NOATIME),
    (os.ST_NODIRATIME, syscalls.MS_NODIRATIME),
    (os.ST_RELATIME, syscalls.MS_RELATIME),
)


def _remount_ro(path: str) -> None:
    """Make a bind mount read-only, keeping the flags the kernel locks in a user namespace."""
    st_flags = os.statvfs(path).f_flag
    flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY
    for st_bit, ms_bit in _ST_TO_MS:
        if st_flags & st_bit:
            flags |= ms_bit
    syscalls.mount(None, path, None, flags)
