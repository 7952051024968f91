"""The seccomp filter of every sandbox, modelled on Docker's default profile, written as data.

The default action is *allow*; the calls below fail with EPERM (or ENOSYS where libc must fall back).
:func:`build_bpf` compiles the policy once (in the zygote); children install the raw program with
:func:`branchbox.backends.container.syscalls.load_seccomp_bpf`.
"""

from __future__ import annotations

import errno
import tempfile

from branchbox.backends.container import syscalls

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
    for name in ENOSYS_CALLS:
        _add(filt, sc.ERRNO(errno.ENOSYS), name)
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask & (1 << i)]


def _add(filt: object, action: int, name: str, *args: object) -> None:
    try:
        filt.add_rule(action, name, *args)  # type: ignore[attr-defined]
    except (OSError, ValueError, RuntimeError):
        return  # not a syscall on this architecture
