"""What a sandbox sees in /dev, and the parts of /proc and /sys it must not see or change (Docker's lists)."""

from __future__ import annotations

# Host device nodes bind-mounted into the sandbox's tmpfs /dev.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

# Symlinks made in /dev: name -> target.
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
    "core": "/proc/kcore",
}

# Files and directories hidden inside /proc and /sys: files get /dev/null bound over them, directories an
# empty read-only tmpfs. Missing paths are skipped.
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/sysrq-trigger",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

# Bound read-only over themselves.
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys")
