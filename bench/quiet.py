"""Waiting for a quiet host between benchmark samples, outside the timed region.

A sample that follows a teardown (a VM killed, its files removed) runs while the kernel still frees memory, writes
back and cleans up btrfs in its own threads, which the benchmark cannot await. ``wait_quiet`` polls ``/proc/stat``
until the host's CPUs were idle for most of a short window, so a row labelled "quiet host" measures the operation
and not the previous sample's aftermath.
"""

from __future__ import annotations

import asyncio
import time

WINDOW_S = 0.1  # /proc/stat counts in 10 ms ticks: 20 per window on 2 CPUs
IDLE_SHARE = 0.8  # of all CPU time in the window
MAX_WAIT_S = 3.0


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


async def wait_quiet(max_wait: float = MAX_WAIT_S) -> float:
    """Until one WINDOW_S window was at least IDLE_SHARE idle (at most ``max_wait`` s); returns the seconds waited."""
    t0 = time.monotonic()
    idle0, total0 = _cpu_times()
    while time.monotonic() - t0 < max_wait:
        await asyncio.sleep(WINDOW_S)  # polling the kernel's counters: there is nothing to await instead
        idle1, total1 = _cpu_times()
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= IDLE_SHARE:
            break
        idle0, total0 = idle1, total1
    return time.monotonic() - t0
