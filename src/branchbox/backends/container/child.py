"""Code that runs in the forked children of the zygote: the namespace holder and the sandbox init.

Process chain for one sandbox (all forks of the single-threaded zygote)::

    zygote ── fork ──> holder: join cgroups, unshare namespaces, wait for the id maps (now a "shell": spares
                       wait here, made ahead of demand), receive the boot request, open the layers,
                       become uid 0 of the new user namespace, fork, report the init's pid, exit
                       └── fork ──> init (pid 1 of the new pid namespace): overlay root, /proc, /dev, /tmp,
                                    pivot_root, hostname, lo, capabilities, no_new_privs, seccomp,
                                    then runs the agent in place (no exec: it is preloaded in the zygote)

Errors go to the status pipe as ``"<step>: <message>"``; EOF on that pipe without data means the agent started.
Nothing here returns: every path ends in ``os._exit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field

from branchbox.backends.container import caps, devices, syscalls
from branchbox.backends.container.cgroups import Cgroups

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_DIR = "mnt"  # in the run dir; holds the empty mount point "root"
MAX_REQUEST = 1 << 20


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


@dataclass(frozen=True, slots=True)
class ChildFds:
    """What the sandbox init inherits from its holder."""

    status_w: int  # "<step>: <message>" on failure, EOF once the agent runs
    listen: int  # the agent's listening socket, becomes fd 3
    log: int  # the agent's stdout/stderr


@dataclass(frozen=True, slots=True)
class HolderFds:
    """Pipes the zygote hands to a holder (all CLOEXEC)."""

    status_w: int  # "<step>: <message>" on failure
    sync_w: int  # holder -> zygote: b"u" after unshare, then the init's pid
    go_r: int  # zygote -> holder: one byte once the id maps are written
    ctl: int  # SOCK_SEQPACKET: the boot request (JSON) with the agent's listening socket and log file
    close: tuple[int, ...]  # zygote-only fds to close in the child


def _fail(status_w: int, step: str, exc: BaseException) -> None:
    msg = f"{step}: {exc}".encode(errors="replace")[:4000]
    with contextlib.suppress(OSError):
        os.write(status_w, msg)
    os._exit(1)


def run_holder(cgroup: str, fds: HolderFds, cgroups: Cgroups, seccomp_bpf: bytes) -> None:
    """Body of the holder process (never returns).

    First it becomes a *shell*: in the cgroup ``cgroup``, in new namespaces with its id maps written, mounts
    private. Then it waits for a boot request on ``fds.ctl`` (a spare shell waits until one is claimed; EOF: the
    zygote is gone, exit) and boots it: open the layers, become uid 0 inside, fork the init, report its pid."""
    step = "holder"
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        for fd in fds.close:
            with contextlib.suppress(OSError):
                os.close(fd)
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)  # a spare never outlives the zygote
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
        step = "make mounts private"
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        step = "wait for a boot request"
        ctl = socket.socket(fileno=fds.ctl)
        raw, passed, _, _ = socket.recv_fds(ctl, MAX_REQUEST, 2)
        if not raw:
            os._exit(0)
        ctl.close()
        step = "boot request"
        if len(passed) != 2:
            _fail(fds.status_w, step, OSError(f"expected 2 descriptors with the request, got {len(passed)}"))
        req = BootRequest(**json.loads(raw))
        _boot(req, fds, ChildFds(status_w=fds.status_w, listen=passed[0], log=passed[1]), seccomp_bpf)
    except BaseException as exc:  # reported to the zygote, then exit
        _fail(fds.status_w, step, exc)


def _boot(req: BootRequest, fds: HolderFds, child: ChildFds, seccomp_bpf: bytes) -> None:
    step = "priority"
    try:
        if req.nice:
            os.setpriority(os.PRIO_PROCESS, 0, req.nice)
        step = "open layers"
        # Opened while still host root inside the new mount namespace: the paths need not be searchable
        # by the unprivileged sandbox uid, the mounts below use /proc/self/fd/N.
        layer_fds = [_open_path(p, "lower layer") for p in req.layers]
        upper_fd = _open_path(req.upper_dir, "upper dir")
        work_fd = _open_path(req.work_dir, "work dir")
        # The overlay goes on <run_dir>/mnt/root: cd there now, while the host-only run dir is searchable.
        os.chdir(os.path.join(req.run_dir, MOUNT_DIR))
        step = "setuid"
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        step = "fork init"
        pid = os.fork()
        if pid == 0:
            os.close(fds.sync_w)
            _run_init(req, child, seccomp_bpf, layer_fds=layer_fds, upper_fd=upper_fd, work_fd=work_fd)
        os.write(fds.sync_w, str(pid).encode())
        os._exit(0)
    except BaseException as exc:  # reported to the zygote, then exit
        _fail(fds.status_w, step, exc)


def _open_path(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} {path}: {exc.strerror}") from None


def _fdpath(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _run_init(
    req: BootRequest,
    fds: ChildFds,
    seccomp_bpf: bytes,
    *,
    layer_fds: list[int],
    upper_fd: int,
    work_fd: int,
) -> None:
    step = "init"
    try:
        os.setsid()
        step = "mount overlay"
        lower = ":".join(_fdpath(fd) for fd in layer_fds)
        opts = f"lowerdir={lower},upperdir={_fdpath(upper_fd)},workdir={_fdpath(work_fd)},userxattr"
        syscalls.mount("overlay", "root", "overlay", 0, opts)
        os.chdir("root")
        for fd in (*layer_fds, upper_fd, work_fd):
            os.close(fd)
        step = "mount /proc"
        _mkdirs("proc", "dev", "sys", "tmp")
        nosuid_nodev_noexec = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
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
        step = "mount /tmp"
        syscalls.mount("tmpfs", "tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777")
        step = "pivot_root"
        syscalls.pivot_root(".", ".")
        syscalls.umount2(".", syscalls.MNT_DETACH)
        os.chdir("/")
        step = "sethostname"
        syscalls.sethostname(req.hostname)
        step = "loopback up"
        syscalls.interface_up("lo")
        step = "stdio"
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(fds.log, 1)
        os.dup2(fds.log, 2)
        os.dup2(fds.listen, 3)
        step = "capabilities"
        caps.apply_default_caps()
        step = "no_new_privs"
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        step = "seccomp"
        syscalls.load_seccomp_bpf(seccomp_bpf)
        step = "start agent"
        _run_agent(req)
    except BaseException as exc:  # reported to the zygote, then exit
        _fail(fds.status_w, step, exc)


def _run_agent(req: BootRequest) -> None:
    """Become the agent without exec: its code is already imported in the zygote (see ``zygote.preload_agent``).

    Closing every fd above 3 also closes the status pipe, which tells the zygote the boot succeeded. Imports can no
    longer load files (``sys.path`` is emptied): nothing the sandbox writes can ever run inside the agent's process.
    """
    from branchbox.agent import server  # noqa: PLC0415 - in sys.modules already (preloaded by the zygote)

    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    syscalls.scrub_process_image(b"branchbox-agent")
    # Not dumpable: the sandbox's root (no CAP_SYS_PTRACE) cannot ptrace or read the memory this process
    # shares with the zygote. Children the agent execs are dumpable again (exec resets it).
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    os.environ.clear()
    os.environ.update(
        {
            "PATH": DEFAULT_PATH,
            "BRANCHBOX_LISTEN_FD": "3",
            "BRANCHBOX_ENV": json.dumps(req.env),
            "BRANCHBOX_WORKDIR": req.workdir,
        }
    )
    sys.path[:] = []
    sys.argv[:] = ["branchbox-agent"]
    server.main()
    os._exit(0)


def _mkdirs(*names: str) -> None:
    for name in names:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755)


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
