"""What the agent's runtime disk (backends/microvm/runtime.py) costs a microVM boot, side by side in one run.

``python bench/microvm_runtime_bench.py [--runs N] [--cache DIR]`` boots the default template, alternating:
- ``cold boot -> agent ready (runtime disk)``: what every cold boot does now (the agent on /.branchbox/rt);
- ``cold boot -> agent ready (image's python3: baseline)``: the same machine without the runtime disk and without
  ``bb.rt``: the shim falls back to the template's python3, as every boot did before the runtime existed;
- ``templated start (runtime disk)`` / ``(image's python3: baseline)``: a restore of each machine's memory
  template into a fresh QEMU, to the agent's first answer (in alternating blocks: one template per digest is kept).
Prints p50/p95/p99 in ms (TCG on hosts whose KVM cannot run standard guests: compare rows, not absolutes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.backends.base import IdMap  # noqa: E402
from branchbox.backends.microvm import MicroVMBackend, MicroVMConfig  # noqa: E402
from branchbox.backends.microvm import image as vm_image  # noqa: E402
from branchbox.backends.microvm.jail import JailConfig  # noqa: E402
from branchbox.backends.microvm.qemu import Machine  # noqa: E402
from branchbox.images.store import TemplateStore  # noqa: E402
from branchbox.timing import PhaseTimer  # noqa: E402
from stats import summarize  # noqa: E402


def _without_runtime(m: Machine) -> Machine:
    return dataclasses.replace(m, runtime=None, cmdline=" ".join(w for w in m.cmdline.split() if w != "bb.rt"))


async def _agent_ready(be: MicroVMBackend, vmid: str, boot: object) -> None:
    handle = boot
    agent = await be._wait_agent(handle)  # type: ignore[arg-type]
    await agent.exec(["true"], timeout=120)
    await agent.aclose()


async def run(templates: Path, cache: Path, data: Path, runs: int) -> dict[str, list[float]]:
    cfg = MicroVMConfig(data_dir=data, cache_dir=cache, pool_size=0,
                        jail=JailConfig(cgroup_parent=f"bench-rt-{data.name}"))  # fmt: skip
    be = MicroVMBackend(cfg)
    await be.start()
    rows: dict[str, list[float]] = {}
    try:
        store = TemplateStore(templates)
        tpl = store.get("default")
        base = await asyncio.to_thread(vm_image.ensure_rootfs, cache, tpl.digest, store.rootfs(tpl.digest), IdMap())
        with_rt = await be.machine(1, 256)
        variants = {"runtime disk": with_rt, "image's python3: baseline": _without_runtime(with_rt)}
        for i in range(runs):
            for name in list(variants) if i % 2 == 0 else list(reversed(variants)):
                vmid = f"bench-{secrets.token_hex(4)}"
                t0 = time.perf_counter()
                handle = await be.cold_boot(vmid, base, variants[name], PhaseTimer())
                try:
                    await _agent_ready(be, vmid, handle)
                    rows.setdefault(f"cold boot -> agent ready ({name})", []).append((time.perf_counter() - t0) * 1e3)
                finally:
                    await be.destroy(vmid, handle)
        # one memory template per digest is kept (another machine's is removed as stale): blocks, alternating
        for block in range(4):
            name = list(variants)[block % 2]
            saved = await be.memory_template(tpl.digest, base, variants[name])
            for _ in range(max(1, runs // 2)):
                sid = f"bench-{secrets.token_hex(4)}"
                t0 = time.perf_counter()
                handle = await be.restore(sid, saved, PhaseTimer())
                try:
                    await _agent_ready(be, sid, handle)
                    rows.setdefault(f"templated start -> first exec ({name})", []).append(
                        (time.perf_counter() - t0) * 1e3
                    )
                finally:
                    await be.destroy(sid, handle)
        # leave the runtime machine's template current, as the daemon wants it
        await be.memory_template(tpl.digest, base, with_rt)
    finally:
        await be.aclose()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--templates", type=Path, default=Path("/var/lib/branchbox/templates"))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BRANCHBOX_VM_CACHE", "/var/lib/branchbox/vm")))
    args = ap.parse_args()
    data = Path(f"/var/tmp/bench-rt-{secrets.token_hex(3)}")
    data.mkdir(mode=0o711, parents=True)
    try:
        rows = asyncio.run(run(args.templates, args.cache, data, args.runs))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    print(f"{'row':64} {'n':>3} {'p50':>8} {'p95':>8} {'p99':>8}  (ms)")
    for name, samples in sorted(rows.items()):
        s = summarize(samples)
        print(f"{name:64} {s.n:3d} {s.p50:8.1f} {s.p95:8.1f} {s.p99:8.1f}")
    print("load:", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
