"""Directory watch latency through the unmodified ``e2b`` SDK against a real ``branchbox serve``: a file written
(``files.write``) -> its CREATE event seen by the client, on the inotify watch (``watch_dir``, the WatchDir
stream) and on the polling the facade did before (a ``files.list`` every 0.2 s, the new name looked for), one
sample of each in turn in the same sandbox, so both see the same machine load (not part of make bench). Each
write waits a random part of the poll interval first, as a user's write falls anywhere in it.

Rows (milliseconds, p50/p95/p99): both latencies, measured from just before the write is sent, and the write's
own round trip (the part of each latency that is not the watch's).

    PYTHONPATH=src .venv/bin/python bench/watch_bench.py [--n 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

from api_bench import running_daemon
from branchbox.core.settings import ManagerSettings
from stats import summarize

POLL_S = 0.2  # the interval of the facade's former polling watcher


async def run(n: int) -> dict[str, list[float]]:
    from e2b import AsyncSandbox  # noqa: PLC0415 (after the environment points it at the daemon)

    samples: dict[str, list[float]] = {"inotify": [], "polling": [], "write": []}
    sbx = await AsyncSandbox.create("default", timeout=600)
    try:
        await sbx.files.make_dir("/tmp/wi")
        await sbx.files.make_dir("/tmp/wp")
        seen: dict[str, float] = {}
        arrived = asyncio.Event()

        def on_event(e: object) -> None:
            seen.setdefault(e.name, time.perf_counter())  # type: ignore[attr-defined]
            arrived.set()

        async def poll() -> None:
            while True:
                for entry in await sbx.files.list("/tmp/wp"):
                    seen.setdefault(entry.name, time.perf_counter())
                arrived.set()
                await asyncio.sleep(POLL_S)

        watch = await sbx.files.watch_dir("/tmp/wi", on_event=on_event, timeout=0)
        poller = asyncio.ensure_future(poll())

        async def sample(directory: str, name: str, keep: bool = True) -> float:
            await asyncio.sleep(random.uniform(0, POLL_S))  # any phase of the poll, as a user's write
            t0 = time.perf_counter()
            await sbx.files.write(f"{directory}/{name}", "x")
            if keep:
                samples["write"].append((time.perf_counter() - t0) * 1e3)
            async with asyncio.timeout(30):
                while name not in seen:
                    arrived.clear()
                    await arrived.wait()
            return (seen[name] - t0) * 1e3

        try:
            for i in range(3):  # warm both paths
                await sample("/tmp/wi", f"warm{i}", keep=False)
                await sample("/tmp/wp", f"warm{i}p", keep=False)
            for i in range(n):
                samples["inotify"].append(await sample("/tmp/wi", f"f{i}"))
                samples["polling"].append(await sample("/tmp/wp", f"p{i}"))
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await watch.stop()
    finally:
        await sbx.kill()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="samples per side")
    args = ap.parse_args()
    templates = Path(os.environ.get("BRANCHBOX_TEST_TEMPLATES", "/var/lib/branchbox/templates"))
    with tempfile.TemporaryDirectory(prefix="watch-bench-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o711)
        settings = ManagerSettings(data_dir=Path(tmp), templates_dir=templates, cgroup_parent="bbwatchbench")
        with running_daemon(settings, "watch", 'network_subnet = "10.214.96.0/20"\n') as url:
            os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY="bb_unchecked_on_loopback")
            samples = asyncio.run(run(args.n))
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"host: {load}")
    for name, label in (("inotify", "write -> event, inotify (WatchDir)"),
                        ("polling", f"write -> seen, polling every {POLL_S} s"),
                        ("write", "files.write round trip alone")):  # fmt: skip
        s = summarize(samples[name])
        print(f"{label:44s} n={s.n:4d} p50={s.p50:8.2f} p95={s.p95:8.2f} p99={s.p99:8.2f} ms")


if __name__ == "__main__":
    main()
