"""What disk limits cost (issue 21.3): the btrfs driver with simple quotas (every upper in the daemon's qgroup,
a limit per sandbox) against the same driver on a filesystem without quotas, side by side in one process,
interleaved call by call: cold create -> first exec, warm create (a pool claim), snapshot and fork x1 of a sandbox
holding 64 MiB of its own data.

``python bench/quota_bench.py [--data-dir DIR] [--runs N]`` (root; needs mkfs.btrfs). Both filesystems are loop
files made for the run and always unmounted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.core.manager import Manager  # noqa: E402
from branchbox.core.pool import PoolConfig  # noqa: E402
from branchbox.core.settings import ManagerSettings  # noqa: E402
from branchbox.models import SandboxInfo  # noqa: E402
from branchbox.storage.btrfs import BtrfsDriver  # noqa: E402
from snapshot_bench import btrfs_loop  # noqa: E402
from stats import summarize  # noqa: E402

_T = TypeVar("_T")


async def _timed(samples: list[float], call: Callable[[], Awaitable[_T]]) -> _T:
    t0 = time.perf_counter()
    out = await call()
    samples.append((time.perf_counter() - t0) * 1e3)
    return out


async def bench(root: Path, templates: Path, runs: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        managers: dict[str, Manager] = {}
        for label in ("quotas", "no quotas"):
            mnt = stack.enter_context(btrfs_loop(root / label.replace(" ", "-"), size_gb=8))
            if mnt is None:
                raise SystemExit("mkfs.btrfs is missing: apt-get install btrfs-progs")
            data = mnt / "data"
            data.mkdir(mode=0o711)
            settings = ManagerSettings(
                data_dir=data,
                templates_dir=templates,
                cgroup_parent=f"branchbox-bench-quota-{label.replace(' ', '')}",
                keep_sandboxes_on_shutdown=False,
                pools=(PoolConfig(template="default", min_size=2, target_free=2, max_size=4),),
            )
            storage = "auto" if label == "quotas" else BtrfsDriver(None)  # None: never turns quotas on
            m = Manager(settings, storage=storage)
            await m.start()
            stack.push_async_callback(m.aclose)
            managers[label] = m
        assert managers["quotas"]._driver.disk_limits == "btrfs squota", managers["quotas"]._driver.disk_limits
        assert managers["no quotas"]._driver.disk_limits is None
        parents: dict[str, SandboxInfo] = {}
        for label, m in managers.items():
            parents[label] = await m.create(cpu=1.0, memory_mb=512, pids=1024, timeout=3600)
            r = await m.exec(parents[label].id, "head -c 64M /dev/urandom > /data && sync")
            assert r.exit_code == 0, r.stderr
        for i in range(runs):
            order = list(managers.items()) if i % 2 == 0 else list(reversed(managers.items()))
            for label, m in order:
                row = samples.setdefault

                async def cold(m: Manager = m) -> None:
                    info = await m.create(memory_mb=256)  # not the pool's size: a cold boot
                    await m.exec(info.id, "true")
                    await m.destroy(info.id)

                t0 = time.perf_counter()
                await cold()
                row(f"{label}: cold create -> first exec (+ destroy)", []).append((time.perf_counter() - t0) * 1e3)
                warm = await _timed(row(f"{label}: warm create (pool claim)", []), lambda m=m: m.create())
                assert warm.source == "warm", warm
                await m.destroy(warm.id)
                pid = parents[label].id
                snap = await _timed(row(f"{label}: snapshot (64 MiB written)", []), lambda m=m, p=pid: m.snapshot(p))
                kids = await _timed(row(f"{label}: fork x1", []), lambda m=m, p=pid: m.fork(p, count=1))
                assert isinstance(kids[0], SandboxInfo), kids
                await m.destroy(kids[0].id)
                await m.delete_snapshot(snap.id)
                await m.wait_background()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    root = Path("/var/tmp/branchbox-bench-quota")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    samples = asyncio.run(bench(root, args.data_dir / "templates", args.runs))
    print(f"load: {os.getloadavg()}")
    print("| benchmark | n | p50 | p95 | p99 | mean |\n|---|---:|---:|---:|---:|---:|")
    for name in sorted(samples, key=lambda n: (n.split(": ")[1], n)):
        s = summarize(samples[name])
        print(f"| {name} | {s.n} | {s.p50:.2f} | {s.p95:.2f} | {s.p99:.2f} | {s.mean:.2f} |")


if __name__ == "__main__":
    main()
