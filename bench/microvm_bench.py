"""microVM benchmarks, with a plain QEMU cold boot as the baseline in the same run.

Called from bench/run.py as ``bench_microvm(settings, runs, results)`` (section ``microvm``); also runnable alone:
``python bench/microvm_bench.py [--data-dir DIR] [--runs N]``. Under TCG (hosts whose KVM cannot run standard
guests) absolute numbers are large; the goals are ratios: templated start >= 10x faster than a cold boot, and
warm claim -> first command <= 20 ms.

Rows:
- ``baseline: plain QEMU cold boot -> agent ready``: spawn QEMU (microvm, kernel + initrd + ext4 disk) and wait
  for the agent's HELLO; what every create would cost without memory templates.
- ``microvm: templated start (fresh QEMU)``: ``Manager.create`` restoring the memory template into a QEMU started
  for it; ``... (-incoming pool)``: the QEMU was waiting in ``-incoming defer``.
- ``microvm: warm claim -> first command``: create from a warm pool of running VMs + ``exec(["true"])``, from a
  quiet host (the previous sample's teardown finished: ``quiet.wait_quiet``) and back to back (claimed the moment
  the pool refilled after the previous destroy), alternating;
  ``... second command``: the next ``exec(["true"])`` in the same VM (what every command costs once warm).
  ``... (fresh QEMU, no jail: baseline)``: the same with ``JailConfig(enabled=False)`` (QEMU as root, no cgroup or
  mount namespace), in alternating halves with the jailed rows: what the jail (launcher, uid, cgroup, mounts)
  costs a create.
- ``microvm: fork xN``, ``microvm: snapshot with memory``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.backends.microvm import MicroVMBackend, MicroVMConfig  # noqa: E402
from branchbox.backends.microvm import image as vm_image  # noqa: E402
from branchbox.backends.microvm.jail import JailConfig  # noqa: E402
from branchbox.core.manager import Manager  # noqa: E402
from branchbox.core.pool import PoolConfig  # noqa: E402
from branchbox.core.settings import ManagerSettings  # noqa: E402
from branchbox.images.store import TemplateStore  # noqa: E402
from branchbox.models import SandboxInfo  # noqa: E402
from branchbox.timing import PhaseTimer  # noqa: E402
from quiet import wait_quiet  # noqa: E402
from stats import Summary, summarize  # noqa: E402

Results = dict[str, Summary]
MEM = 256


def _config(settings: ManagerSettings, pool: int, *, jail: bool = True) -> MicroVMConfig:
    cache = Path(os.environ.get("BRANCHBOX_VM_CACHE") or settings.template_root.parent / "vm")
    cfg = JailConfig(enabled=jail, cgroup_parent=f"{settings.cgroup_parent}-vm")
    return MicroVMConfig(data_dir=settings.data_dir, cache_dir=cache, pool_size=pool, jail=cfg)


@contextlib.asynccontextmanager
async def _manager(settings: ManagerSettings, be: MicroVMBackend) -> AsyncIterator[Manager]:
    await be.start()
    m = Manager(settings, backends={"microvm": be})
    try:
        await m.start()
        yield m
    finally:
        await m.aclose()


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


async def _cold_boots(settings: ManagerSettings, runs: int) -> list[float]:
    be = MicroVMBackend(_config(settings, 0))
    await be.start()
    try:
        tpl = TemplateStore(settings.template_root).get("default")
        tree = TemplateStore(settings.template_root).rootfs(tpl.digest)
        base = await asyncio.to_thread(vm_image.ensure_rootfs, be.config.cache_dir, tpl.digest, tree, settings.idmap)
        m = await be.machine(1, MEM)
        out = []
        for _ in range(runs):
            vmid = f"bench-{secrets.token_hex(4)}"
            t0 = time.perf_counter()
            handle = await be.cold_boot(vmid, base, m, PhaseTimer())
            try:
                agent = await be._wait_agent(handle)
                out.append(_ms(t0))
                await agent.aclose()
            finally:
                await be.destroy(vmid, handle)
        return out
    finally:
        await be.aclose()


async def _templated(
    settings: ManagerSettings, runs: int, pool: int, *, jail: bool = True
) -> tuple[list[float], dict[str, list[float]]]:
    be = MicroVMBackend(_config(settings, pool, jail=jail))
    out: list[float] = []
    phases: dict[str, list[float]] = {}
    async with _manager(settings, be) as m:
        await m.destroy((await m.create(backend="microvm", memory_mb=MEM)).id)  # memory template made, pool started
        for _ in range(runs):
            for p in be._pools.values():
                await p.wait_ready()
            t0 = time.perf_counter()
            info = await m.create(backend="microvm", memory_mb=MEM)
            out.append(_ms(t0))
            for k, v in info.timings.items():
                phases.setdefault(k, []).append(v)
            await m.destroy(info.id)
    return out, phases


async def _warm_claims(settings: ManagerSettings, runs: int) -> dict[str, list[float]]:
    """Rows ``quiet`` and ``churn`` (claim -> first command), ``claim`` (create only), ``later`` (second command).

    Samples alternate: ``quiet`` waits for the host to go idle after the pool refilled (the previous sandbox's
    teardown, which the kernel finishes in its own threads, is over: the steady state of a claim); ``churn`` claims
    the moment the pool is full again, right after the previous sandbox was destroyed (back-to-back churn)."""
    pool = PoolConfig(template="default", min_size=1, target_free=1, max_size=2, memory_mb=MEM)
    s = dataclasses.replace(settings, default_backend="microvm", pools=(pool,))
    be = MicroVMBackend(_config(s, 1))
    rows: dict[str, list[float]] = {"quiet": [], "churn": [], "claim": [], "later": []}
    async with _manager(s, be) as m:
        for i in range(2 * runs):
            await m.wait_pool_ready("default")
            for p in be._pools.values():  # and the -incoming slot behind it: nothing of ours is still starting
                await p.wait_ready()
            quiet = i % 2 == 0
            if quiet:
                await wait_quiet()
            t0 = time.perf_counter()
            info = await m.create(template="default", memory_mb=MEM)
            rows["claim"].append(_ms(t0))
            r = await m.exec(info.id, ["true"])
            rows["quiet" if quiet else "churn"].append(_ms(t0))
            assert info.source == "warm"
            assert r.exit_code == 0
            t1 = time.perf_counter()
            await m.exec(info.id, ["true"])  # before the pool's refill starts competing for the CPU
            rows["later"].append(_ms(t1))
            await m.destroy(info.id)
        await m.remove_pool("default")
    return rows


async def _forks_and_snapshots(settings: ManagerSettings, runs: int, results: Results) -> None:
    be = MicroVMBackend(_config(settings, 0))
    async with _manager(settings, be) as m:
        parent = await m.create(backend="microvm", memory_mb=MEM)
        await m.spawn(parent.id, "i=0; while true; do i=$((i+1)); sleep 0.1; done")
        snap_ms, fork1, fork8 = [], [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            snap = await m.snapshot(parent.id)
            snap_ms.append(_ms(t0))
            await m.delete_snapshot(snap.id)
        for count, sink, n in ((1, fork1, runs), (8, fork8, max(1, runs // 3))):
            for _ in range(n):
                t0 = time.perf_counter()
                kids = await m.fork(parent.id, count=count)
                sink.append(_ms(t0))
                assert all(isinstance(k, SandboxInfo) for k in kids), kids
                for k in kids:
                    if isinstance(k, SandboxInfo):
                        await m.destroy(k.id)
        await m.destroy(parent.id)
        await m.wait_background()
    results["microvm: snapshot with memory (256 MiB guest)"] = summarize(snap_ms)
    results["microvm: fork x1 (running, with memory)"] = summarize(fork1)
    results["microvm: fork x8 (running, with memory)"] = summarize(fork8)


async def bench_microvm(settings: ManagerSettings, runs: int, results: Results) -> None:
    root = settings.data_dir / f"microvm-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    os.chmod(root, 0o711)
    s = dataclasses.replace(settings, data_dir=root)
    try:
        cold = await _cold_boots(s, max(3, runs // 6))
        fresh, phases = [], {}
        bare, bphases = [], {}
        for _ in range(2):  # alternating halves: the jail's cost next to QEMU without it, in the same run
            for acc, ph, jail in ((fresh, phases, True), (bare, bphases, False)):
                got, got_phases = await _templated(s, max(3, runs // 6), pool=0, jail=jail)
                acc.extend(got)
                for k, v in got_phases.items():
                    ph.setdefault(k, []).extend(v)
        pooled, pphases = await _templated(s, max(5, runs // 3), pool=1)
        warm = await _warm_claims(s, max(20, runs))
        await _forks_and_snapshots(s, max(3, runs // 6), results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["baseline: plain QEMU cold boot -> agent ready"] = summarize(cold)
    results["microvm: templated start (fresh QEMU)"] = summarize(fresh)
    results["microvm: templated start (fresh QEMU, no jail: baseline)"] = summarize(bare)
    results["microvm: templated start (-incoming pool)"] = summarize(pooled)
    for k, v in pphases.items():
        results[f"microvm: templated start (pool) phase {k}"] = summarize(v)
    for k in ("vm_prepare", "vm_spawn", "vm_qmp", "vm_incoming"):
        if k in phases:
            results[f"microvm: templated start (fresh) phase {k}"] = summarize(phases[k])
        if k in bphases:
            results[f"microvm: templated start (fresh, no jail) phase {k}"] = summarize(bphases[k])
    results["microvm: warm claim -> first command (quiet host)"] = summarize(warm["quiet"])
    results["microvm: warm claim -> first command (back-to-back churn)"] = summarize(warm["churn"])
    results["microvm: warm claim (create only)"] = summarize(warm["claim"])
    results["microvm: second command in the claimed VM (exec true)"] = summarize(warm["later"])
    c, p = summarize(cold).p50, summarize(pooled).p50
    results["microvm: ratio cold boot / templated start (pool), p50"] = summarize([c / p])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    settings = ManagerSettings(data_dir=args.data_dir / "bench", templates_dir=args.data_dir / "templates",
                               cgroup_parent="branchbox-bench", keep_sandboxes_on_shutdown=False)  # fmt: skip
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    results: Results = {}
    asyncio.run(bench_microvm(settings, args.runs, results))
    for name, r in results.items():
        print(f"{name:60s} p50 {r.p50:9.1f}  p95 {r.p95:9.1f}  p99 {r.p99:9.1f}  n={r.n}")


if __name__ == "__main__":
    main()
