"""Snapshot, fork and restore of a sandbox holding a 20k-file tree, per storage driver, with a ``cp -a`` baseline.

Called from bench/run.py as ``bench_snapshots(settings, runs, results)``; also runnable alone:
``python bench/snapshot_bench.py [--data-dir DIR] [--runs N]``. The btrfs driver is measured on a btrfs loop
filesystem made for the run (needs mkfs.btrfs) and always unmounted afterwards.

``--uid-ranges`` compares create and fork with one shared uid range (as before issue 22.1) and with per-sandbox
ranges, interleaved on one btrfs loop filesystem (rows marked ``[shared range]`` / ``[own ranges]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.backends.container import ContainerBackend  # noqa: E402
from branchbox.core.manager import Manager  # noqa: E402
from branchbox.core.settings import ManagerSettings  # noqa: E402
from branchbox.models import SandboxInfo  # noqa: E402
from stats import Summary, summarize  # noqa: E402

Results = dict[str, Summary]
TREE = (
    "import os\nfor i in range(200):\n d=f'/work/t/{i}'; os.makedirs(d)\n"
    " for j in range(100):\n  open(f'{d}/{j}.py','w').write('x = %d\\n' % (i*j))"
)  # 200 dirs x 100 files = 20 000 files


@contextlib.contextmanager
def btrfs_loop(root: Path, size_gb: int = 8) -> Iterator[Path | None]:
    """A btrfs filesystem on a sparse loop file under ``root``; None when mkfs.btrfs is missing."""
    if shutil.which("mkfs.btrfs") is None:
        print("btrfs driver skipped: mkfs.btrfs is not installed (apt-get install btrfs-progs)")
        yield None
        return
    img, mnt = root / "bench-btrfs.img", root / "bench-btrfs"
    mnt.mkdir(parents=True, exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(size_gb << 30)
    mounted = False
    try:
        subprocess.run(["mkfs.btrfs", "-q", "-f", str(img)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, capture_output=True)
        mounted = True  # mount -o loop sets autoclear: umount detaches the loop device
        os.chmod(mnt, 0o711)
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()
        img.unlink(missing_ok=True)


def _cp_baseline(tree: Path, scratch: Path, n: int) -> list[float]:
    """``cp -a`` of the tree itself: what a naive snapshot costs."""
    out = []
    for _ in range(n):
        dest = Path(tempfile.mkdtemp(dir=scratch)) / "t"
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", str(tree), str(dest)], check=True)
        out.append((time.perf_counter() - t0) * 1e3)
        shutil.rmtree(dest.parent)
    return out


async def bench_driver(settings: ManagerSettings, runs: int, results: Results) -> None:
    async with Manager.open(settings) as m:
        pre = f"snapshot[{m.storage_driver}]"
        for old in await m.list_snapshots():  # left by an interrupted run
            await m.delete_snapshot(old.id)
        src = await m.create(memory_mb=1024, timeout=6 * 3600)
        r = await m.exec(src.id, ["python3", "-c", TREE])
        assert r.exit_code == 0, r.stderr
        await m.delete_snapshot((await m.snapshot(src.id)).id)  # warm caches once
        snap_ms: list[float] = []
        phases: dict[str, list[float]] = {}
        fork1: list[float] = []
        fork16: list[float] = []
        fork16_busy: list[float] = []
        restore: list[float] = []
        taken = []
        for _ in range(runs):  # snapshots accumulate (deleting them in between would time the removal too)
            t0 = time.perf_counter()
            snap = await m.snapshot(src.id)
            snap_ms.append((time.perf_counter() - t0) * 1e3)
            taken.append(snap.id)
            for k, v in snap.timings.items():
                phases.setdefault(k, []).append(v)
        for sid in taken:
            await m.delete_snapshot(sid)
        await m.wait_background()
        for n, samples, reps in ((1, fork1, runs), (16, fork16, max(3, runs // 6))):
            for _ in range(reps):
                await _spares_settled(m)
                t0 = time.perf_counter()
                kids = await m.fork(src.id, count=n)
                samples.append((time.perf_counter() - t0) * 1e3)
                infos = [k for k in kids if isinstance(k, SandboxInfo)]
                assert len(infos) == n, kids
                await asyncio.gather(*(m.destroy(k.id) for k in infos))
                await m.wait_background()
        for _ in range(max(3, runs // 6)):  # the worst case: no primed shell left from the fork before
            t0 = time.perf_counter()
            kids = await m.fork(src.id, count=16)
            fork16_busy.append((time.perf_counter() - t0) * 1e3)
            infos = [k for k in kids if isinstance(k, SandboxInfo)]
            assert len(infos) == 16, kids
            await asyncio.gather(*(m.destroy(k.id) for k in infos))
        await m.wait_background()
        base = await m.snapshot(src.id)
        for _ in range(runs):
            t0 = time.perf_counter()
            b = await m.create(snapshot=base.id)
            r = await m.exec(b.id, "true")
            restore.append((time.perf_counter() - t0) * 1e3)
            assert r.exit_code == 0
            await m.destroy(b.id)
        await m.delete_snapshot(base.id)
        results[f"{pre}: snapshot (20k-file sandbox)"] = summarize(snap_ms)
        for k, samples in phases.items():
            results[f"{pre}: snapshot phase {k}"] = summarize(samples)
        results[f"{pre}: fork x1"] = summarize(fork1)
        results[f"{pre}: fork x16"] = summarize(fork16)
        results[f"{pre}: fork x16 back to back (no primed shells left)"] = summarize(fork16_busy)
        results[f"{pre}: restore -> first exec"] = summarize(restore)
        tree = m._driver.upper_dir(m._sandbox_dir(src.id)) / "work" / "t"  # the host path of the tree
        cp = await asyncio.to_thread(_cp_baseline, tree, settings.data_dir, max(3, runs // 4))
        results[f"{pre}: baseline cp -a of the 20k-file tree"] = summarize(cp)
        await m.destroy(src.id)
        await m.wait_background()


async def _spares_settled(m: Manager, limit_s: float = 5.0) -> None:
    """Wait (at most ``limit_s``) until the container backend's zygote has no boot in flight and no spare shell
    being primed: the steady state between two bursts (a user runs commands in the children before forking
    again). The back-to-back row measures the other case."""
    be = m._backends.get("container")
    if not isinstance(be, ContainerBackend):
        return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        st = await be.zygote_status()
        if not st.get("spares_making") and not st.get("booting"):
            return
        await asyncio.sleep(0.01)


async def bench_snapshots(settings: ManagerSettings, runs: int, results: Results) -> None:
    """Both storage drivers: overlay on ``settings.data_dir``'s filesystem, btrfs on a loop filesystem."""
    overlay_dir = settings.data_dir / "snap-overlay"
    overlay_dir.mkdir(mode=0o711, exist_ok=True)
    await bench_driver(dataclasses.replace(settings, data_dir=overlay_dir), runs, results)
    with btrfs_loop(settings.data_dir) as mnt:
        if mnt is not None:
            s = dataclasses.replace(settings, data_dir=mnt / "data", cgroup_parent=settings.cgroup_parent + "-btrfs")
            s.data_dir.mkdir(mode=0o711, exist_ok=True)
            await bench_driver(s, runs, results)


async def bench_uid_ranges(settings: ManagerSettings, runs: int, results: Results) -> None:
    """Create, fork and restore with one shared uid range (as before issue 22.1) and with per-sandbox ranges (a
    block claimed like a daemon's), two Managers on one btrfs loop filesystem, measured interleaved (A, B, A, B...)
    so that the host's load hits both alike. Each row is the call until the new sandbox ran a first command."""
    from branchbox.daemon.claims import Wanted, claim  # noqa: PLC0415 - only this comparison claims a block

    with btrfs_loop(settings.data_dir) as mnt:
        if mnt is None:
            return
        async with contextlib.AsyncExitStack() as stack:
            managers: dict[str, Manager] = {}
            sources: dict[str, str] = {}
            for tag, ranges in (("shared range", 0), ("own ranges", 64)):
                data = mnt / f"data-{ranges}"
                data.mkdir(mode=0o711, exist_ok=True)
                parent = f"{settings.cgroup_parent}-uid{ranges}"
                host = claim(data, Wanted(network=False, cgroup_parent=parent, uid_ranges=ranges))
                stack.callback(host.release)
                block = host.names.uid_block()
                s = dataclasses.replace(settings, data_dir=data, cgroup_parent=parent,
                                        uid_ranges=None if block is None else (block[0], ranges))  # fmt: skip
                m = managers[tag] = await stack.enter_async_context(Manager.open(s))
                src = await m.create(timeout=3600)
                r = await m.exec(src.id, ["python3", "-c", TREE.replace("200", "20")])  # 2k files
                assert r.exit_code == 0, r.stderr
                sources[tag] = src.id
            samples: dict[str, list[float]] = {}
            for i in range(runs):
                for tag, m in managers.items() if i % 2 == 0 else reversed(managers.items()):
                    await _spares_settled(m)
                    t0 = time.perf_counter()
                    info = await m.create()
                    await m.exec(info.id, "true")
                    samples.setdefault(f"create -> first exec [{tag}]", []).append((time.perf_counter() - t0) * 1e3)
                    await m.destroy(info.id)
                    await _spares_settled(m)
                    t0 = time.perf_counter()
                    kid = (await m.fork(sources[tag], count=1))[0]
                    assert isinstance(kid, SandboxInfo), kid
                    await m.exec(kid.id, "true")
                    samples.setdefault(f"fork x1 -> first exec [{tag}]", []).append((time.perf_counter() - t0) * 1e3)
                    await m.destroy(kid.id)
                    await m.wait_background()
            for name in sorted(samples):
                results[f"snapshot[btrfs]: {name}"] = summarize(samples[name])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--uid-ranges", action="store_true", help="btrfs only: shared uid range vs per-sandbox ranges")
    args = ap.parse_args()
    bench_data = args.data_dir / "bench"
    bench_data.mkdir(parents=True, exist_ok=True)
    os.chmod(bench_data, 0o711)
    settings = ManagerSettings(
        data_dir=bench_data,
        templates_dir=args.data_dir / "templates",
        cgroup_parent="branchbox-bench",
        keep_sandboxes_on_shutdown=False,
    )
    results: Results = {}
    bench = bench_uid_ranges if args.uid_ranges else bench_snapshots
    asyncio.run(bench(settings, args.runs, results))
    print("| benchmark | n | p50 | p95 | p99 | mean |\n|---|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s.n} | {s.p50:.2f} | {s.p95:.2f} | {s.p99:.2f} | {s.mean:.2f} |")


if __name__ == "__main__":
    main()
