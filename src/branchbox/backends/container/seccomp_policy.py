"""The seccomp filter of every sandbox, modelled on Docker's default profile, written as data.

The default action is *allow*; the calls below fail with EPERM (or ENOSYS where libc must fall back), and
``socket``/``socketpair`` fail with EPERM for every address family outside :data:`SOCKET_FAMILIES`.
:func:`build_bpf` compiles the policy once (in the zygote); children install the raw program with
:func:`branchbox.backends.container.syscalls.load_seccomp_bpf`.
"""

from __future__ import annotations

import errno
import tempfile

import branchbox.backends.container.syscalls as syscalls

# Each group: why it is denied -> syscall names. Names unknown to this architecture are skipped.
DENIED: dict[str, tuple[str, ...]] = {
    # Filesystem topology: a sandbox must not change its mounts or escape its root.
    "mounts": ("mount", "umount", "umount2", "pivot_root"),
    # The new mount API can build and attach mounts without mount(2).
    "new_mount_api": ("fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr"),
    # Kernel code loading and replacement.
    "kernel_modules": ("init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load"),
    # Machine-wide power and swap state.
    "machine": ("reboot", "swapon", "swapoff"),
    # The host clock is shared by every sandbox.
    "clock": ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime"),
    # Kernel attack surface Docker blocks by default.
    "kernel_surface": ("bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "kcmp", "nfsservctl"),
    # Kernel keyrings are not namespaced.
    "keyring": ("keyctl", "add_key", "request_key"),
    # Handle-based opens bypass path permission checks (the "shocker" escape).
    "handles": ("open_by_handle_at", "name_to_handle_at"),
    # Joining other namespaces.
    "namespaces": ("setns",),
    # Accounting, quotas, raw I/O ports, the kernel log.
    "host_admin": (
        "acct",
        "quotactl",
        "quotactl_fd",
        "iopl",
        "ioperm",
        "syslog",
        "vhangup",
        "pciconfig_iobase",
    ),
    # io_uring runs I/O from kernel workers outside the calls seccomp sees, and has been a steady source of kernel
    # privilege escalations (Docker and ChromeOS deny it; Google disabled it on its servers).
    "io_uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    # Obsolete or host-level calls Docker denies.
    "obsolete": (
        "uselib",
        "sysfs",
        "_sysctl",
        "ustat",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "vm86",
        "vm86old",
        "get_mempolicy",
        "set_mempolicy",
        "mbind",
        "move_pages",
        "migrate_pages",
    ),
}

# Calls denied only when their flags ask for a new namespace (arg index, mask).
NAMESPACE_FLAGS = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWUSER
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWCGROUP
    | syscalls.CLONE_NEWTIME
)
FLAG_FILTERED: dict[str, int] = {"unshare": 0, "clone": 0}

# The address families a sandbox may open sockets of; every other family gets EPERM (Docker denies AF_VSOCK the
# same way). AF_UNIX: local IPC (the agent, databases, X11...); AF_INET/AF_INET6: the network (raw sockets too, so
# ping works with CAP_NET_RAW); AF_NETLINK: `ip addr`, `ss`, glibc's getifaddrs and getaddrinfo's AI_ADDRCONFIG.
# Denied, among others: AF_VSOCK (the host's and microVMs' vsock services, unauthenticated), AF_PACKET (raw frames:
# ARP/DHCP spoofing on the sandbox's link, and a long list of kernel CVEs reachable with CAP_NET_RAW in a user
# namespace: tcpdump and arping do not work), AF_XDP, AF_ALG (kernel crypto API), AF_KEY, AF_TIPC, AF_RDS, AF_CAN,
# AF_BLUETOOTH, AF_KCM, AF_SMC: kernel code no sandboxed program needs. Families the kernel adds later are denied too.
SOCKET_FAMILIES: dict[str, int] = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
# Families below this bound are denied one by one; the kernel's AF_MAX is 46 (6.x), so 64 leaves room.
_FAMILY_BOUND = 64
_SOCKET_CALLS = ("socket", "socketpair")

# clone3 passes its flags in memory where seccomp cannot look: ENOSYS makes libc fall back to clone.
ENOSYS_CALLS = ("clone3",)


def build_bpf() -> bytes:
    """Compile the policy to a raw BPF program for this machine's architecture."""
    import pyseccomp as sc  # noqa: PLC0415 - only the zygote needs libseccomp

    filt = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for names in DENIED.values():
        for name in names:
            _add(filt, eperm, name)
    for name, arg in FLAG_FILTERED.items():
        for flag in _bits(NAMESPACE_FLAGS):
            _add(filt, eperm, name, sc.Arg(arg, sc.MASKED_EQ, flag, flag))
    for name in _SOCKET_CALLS:
        for family in denied_families():
            # the family is an int: compare the low 32 bits only, as the kernel reads it
            _add(filt, eperm, name, sc.Arg(0, sc.MASKED_EQ, 0xFFFFFFFF, family))
        # anything at or above the bound (whatever its upper bits) is not a family the sandbox may use
        _add(filt, eperm, name, sc.Arg(0, sc.GE, _FAMILY_BOUND))
    for name in ENOSYS_CALLS:
        _add(filt, sc.ERRNO(errno.ENOSYS), name)
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


def denied_families() -> list[int]:
    """Every address family number below the bound that :data:`SOCKET_FAMILIES` leaves out."""
    allowed = set(SOCKET_FAMILIES.values())
    return [f for f in range(_FAMILY_BOUND) if f not in allowed]


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask & (1 << i)]


def _add(filt: object, action: int, name: str, *args: object) -> None:
    try:
        filt.add_rule(action, name, *args)  # type: ignore[attr-defined]
    except (OSError, ValueError, RuntimeError):
        return  # not a syscall on this architecture
