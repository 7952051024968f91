"""Networking numbers for ``make bench`` (section ``network``).

* Warm create (the claim of a pool member, in-process) without networking vs with it (default policy: nothing to
  do on the claim) vs with a policy that differs from the pooled one (one in-process nftables transaction).
  Goal: <= 1 ms apart at p50. Also the ``network`` phase of a cold create (veth + addresses + rules).
* The port proxy vs direct: a 1 KiB GET's round trip and a 64 MiB download's throughput, through
  ``/v1/sandboxes/{id}/ports/8000/`` of a real daemon vs straight to the sandbox's address from the host.

Called from bench/run.py as ``bench_network(settings, runs, results)``; also runnable alone:
``python bench/net_bench.py [--data-dir DIR] [--runs N]``. No traffic leaves the host: the sandboxes' DNS
upstream is 127.0.0.1:9 and nothing is fetched from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.core.manager import Manager  # noqa: E402
from branchbox.core.pool import PoolConfig  # noqa: E402
from branchbox.core.settings import ManagerSettings  # noqa: E402
from branchbox.net import NetworkSettings  # noqa: E402
from branchbox.sdk import Sandbox  # noqa: E402
from stats import Summary, summarize  # noqa: E402

Results = dict[str, Summary]
POOL = 4
BIG_MB = 64


def bench_settings() -> NetworkSettings:
    return NetworkSettings(subnet="10.201.0.0/16", table="branchbox_bench", if_prefix="bbb", dns_upstream="127.0.0.1:9")


async def _warm_creates(
    settings: ManagerSettings, runs: int, **create: object
) -> tuple[list[float], list[float], list[float]]:
    """(wall ms of create() on a ready pool, the 'network' phase of cold creates, wall ms of destroy())."""
    walls: list[float] = []
    cold_net: list[float] = []
    destroys: list[float] = []
    async with Manager.open(settings) as m:
        await m.configure_pool(PoolConfig(template="default", min_size=POOL, target_free=POOL, max_size=POOL,
                                          memory_mb=128))  # fmt: skip
        for _ in range(runs):
            await m.wait_pool_ready("default", POOL)
            t0 = time.perf_counter()
            info = await m.create(memory_mb=128, **create)  # type: ignore[arg-type]
            walls.append((time.perf_counter() - t0) * 1e3)
            assert info.source == "warm", info.source
            t0 = time.perf_counter()
            await m.destroy(info.id)
            destroys.append((time.perf_counter() - t0) * 1e3)
        if settings.network is not None:
            for _ in range(min(runs, 20)):
                info = await m.create(memory_mb=64)  # other resources: a cold create
                cold_net.append(info.timings["network"])
                await m.destroy(info.id)
        await m.remove_pool("default")
    return walls, cold_net, destroys


def _proxy_vs_direct(settings: ManagerSettings, runs: int, results: Results) -> None:
    from api_bench import running_daemon  # noqa: PLC0415 - shares the daemon helper

    config = 'network_subnet = "10.202.0.0/16"\nnetwork_dns_upstream = "127.0.0.1:9"\n'
    with running_daemon(settings, name="net", config=config) as url, Sandbox.create(base_url=url) as sbx:
        sbx.commands.run(
            f"mkdir -p /tmp/www && head -c 1024 /dev/zero > /tmp/www/small && "
            f"head -c {BIG_MB * 1024 * 1024} /dev/zero > /tmp/www/big"
        )
        sbx.commands.run("python3 -m http.server 8000 --bind 0.0.0.0 --directory /tmp/www", background=True)
        proxy = sbx.get_host(8000)
        direct = f"http://{sbx.get_network().address}:8000/"
        with httpx.Client(timeout=60, trust_env=False) as c:
            deadline = time.monotonic() + 60
            while True:  # the server starts in the sandbox: poll its port
                try:
                    if c.get(direct + "small").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the sandbox's http.server did not start")
                time.sleep(0.05)
            for name, base in (("direct", direct), ("proxy", proxy)):
                lat = []
                for _ in range(runs * 2):
                    t0 = time.perf_counter()
                    r = c.get(base + "small")
                    lat.append((time.perf_counter() - t0) * 1e3)
                    assert r.status_code == 200
                    assert len(r.content) == 1024
                results[f"network: GET 1 KiB from a sandbox port, {name} (ms)"] = summarize(lat)
                mbps = []
                for _ in range(max(3, runs // 10)):
                    t0 = time.perf_counter()
                    n = 0
                    with c.stream("GET", base + "big") as s:
                        for chunk in s.iter_raw(1 << 20):
                            n += len(chunk)
                    assert n == BIG_MB * 1024 * 1024, (name, n)
                    mbps.append(n / 1e6 / (time.perf_counter() - t0))
                results[f"network: {BIG_MB} MiB download from a sandbox port, {name} (MB/s)"] = summarize(mbps)


async def _creates(settings: ManagerSettings, runs: int, results: Results) -> None:
    plain = dataclasses.replace(settings, cgroup_parent=settings.cgroup_parent + "-nonet", network=None)
    walls, _, destroys = await _warm_creates(plain, runs)
    results["network: warm create (claim), networking off (baseline)"] = summarize(walls)
    results["network: destroy, networking off (baseline)"] = summarize(destroys)
    netted = dataclasses.replace(settings, cgroup_parent=settings.cgroup_parent + "-net",
                                 network=bench_settings())  # fmt: skip
    walls, cold, destroys = await _warm_creates(netted, runs)
    results["network: warm create (claim), default policy"] = summarize(walls)
    results["network: destroy, networked (rules, veth)"] = summarize(destroys)
    results["network: cold create phase 'network' (veth + addresses + rules)"] = summarize(cold)
    walls, _, _ = await _warm_creates(netted, runs, allow_internet_access=False)
    results["network: warm create (claim), allow_internet_access=False"] = summarize(walls)
    walls, _, _ = await _warm_creates(netted, runs, network={"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]})
    results["network: warm create (claim), allow list (pypi.org, deny 0.0.0.0/0)"] = summarize(walls)


def bench_network(settings: ManagerSettings, runs: int, results: Results) -> None:
    asyncio.run(_creates(settings, runs, results))
    _proxy_vs_direct(settings, runs, results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    data = args.data_dir / "bench"
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o711)
    settings = ManagerSettings(
        data_dir=data,
        templates_dir=args.data_dir / "templates",
        cgroup_parent="branchbox-bench",
        keep_sandboxes_on_shutdown=False,
    )
    results: Results = {}
    bench_network(settings, args.runs, results)
    for name, s in results.items():
        print(f"{name:75s} p50 {s.p50:9.3f}  p95 {s.p95:9.3f}  p99 {s.p99:9.3f}")


if __name__ == "__main__":
    main()
