"""API-level numbers for ``make bench``: the SDK over HTTP against a real ``branchbox serve`` on loopback.

``bench_api``: cold create -> first exec, destroy, exec round trips, the HTTP floor. ``bench_paired`` measures what
the API adds: in-process Manager calls and the same calls through the SDK over HTTP, interleaved one by one in one
event loop, so both see the same machine load, and both with networking on like the daemon's default (the goal is
<= 1 ms p50 added by the API): cold create -> first exec (and the create alone), a warm create (a claim from a pool
of the same size on both sides) -> first exec, and the exec round trip. The ``core:`` rows of run.py are in-process
without networking.

``bench_pools`` (called from ``bench_api``): a daemon with a warm pool of 32 for the default template; create ->
first command result warm and cold, sequential and in bursts of 32 concurrent. The pool refills between
measurements, waited for by polling ``GET /v1/pools/default`` outside the timed region. The ``docker run`` baseline
of the same run is ``bench_docker`` in run.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from branchbox.core.manager import Manager
from branchbox.core.pool import PoolConfig
from branchbox.core.settings import ManagerSettings
from branchbox.net import NetworkSettings
from branchbox.sdk import AsyncSandbox, Sandbox
from null_http import null_daemon
from stats import Summary, summarize

Results = dict[str, Summary]
POOL_SIZE = 32
POOL_MEMORY_MB = 128  # small, so 32 members fit anywhere; a create with other resources misses the pool
BURSTS = 5
MIN_SEQUENTIAL = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _destroy_all(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        for sbx in httpx.get(url + "/v1/sandboxes", timeout=30).json():
            httpx.delete(f"{url}/v1/sandboxes/{sbx['sandbox_id']}", timeout=60)


@contextlib.contextmanager
def running_daemon(settings: ManagerSettings, name: str = "api", config: str | None = None) -> Iterator[str]:
    """A daemon subprocess on a free port (warning-level logs, sandboxes stopped on exit); yields its URL.

    Every sandbox is destroyed and the daemon stopped at the end, also when the benchmark fails.
    """
    data_dir = settings.data_dir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o711)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBOX_")}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # its host-unique names (cgroup parent, nftables table, subnet, uid ranges) are the daemon's own, derived from
    # its data dir and claimed host-wide, as for a user's `branchbox serve`: a bench next to another daemon or
    # another bench (a second --data-dir) neither collides nor is refused
    env.update(
        BRANCHBOX_KEEP_SANDBOXES_ON_SHUTDOWN="false",
        BRANCHBOX_LOG_LEVEL="warning",
    )
    argv = [
        sys.executable, "-m", "branchbox.cli", "serve", "--port", str(port),
        "--data-dir", str(data_dir), "--templates-dir", str(settings.template_root),
    ]  # fmt: skip
    if config is not None:
        (data_dir / "config.toml").write_text(config)
        argv += ["--config", str(data_dir / "config.toml")]
    log = open(data_dir / "daemon.log", "ab")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness of a separate process: poll /health
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited: see {data_dir / 'daemon.log'}")
            try:
                Sandbox.list(base_url=url, request_timeout=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            _destroy_all(url)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _outside(wall_ms: float, result: Any, timings: Mapping[str, float] | None = None) -> float:
    """A sample's time outside the Manager's own timers: its wall minus the exec's agent round trip (``result``)
    and, for a create -> first exec, the create's phase total (``timings``)."""
    return wall_ms - result.duration_ms - (timings["total"] if timings is not None else 0.0)


def bench_api(settings: ManagerSettings, runs: int, results: Results) -> None:
    with running_daemon(settings) as url:
        warm = Sandbox.create(base_url=url)
        warm.commands.run("true")
        create_first: list[float] = []
        destroy: list[float] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sbx = Sandbox.create(base_url=url)
            assert sbx.commands.run("true").exit_code == 0
            create_first.append(_ms(t0))
            t0 = time.perf_counter()
            sbx.kill()
            destroy.append(_ms(t0))
            sbx.close()
        results["api: cold create -> first exec (SDK over HTTP)"] = summarize(create_first)
        results["api: destroy (SDK over HTTP)"] = summarize(destroy)
        for label, cmd in (("true", "true"), ("argv ['true']", ["true"])):
            samples = []
            for _ in range(runs * 4):
                t0 = time.perf_counter()
                warm.commands.run(cmd)
                samples.append(_ms(t0))
            results[f"api: exec round trip ({label}, sync SDK)"] = summarize(samples)
        streamed = []
        for _ in range(runs):
            t0 = time.perf_counter()
            warm.commands.run("true", on_stdout=lambda _: None)
            streamed.append(_ms(t0))
        results["api: exec round trip (true, streamed over WebSocket)"] = summarize(streamed)
        results["api: exec round trip (true, async SDK)"] = summarize(
            asyncio.run(_async_exec(url, warm.sandbox_id, runs * 4))
        )
        health = []
        for _ in range(runs * 4):
            t0 = time.perf_counter()
            warm._http.wire.request("GET", "/health", None, 10.0)  # the SDK's keep-alive path
            health.append(_ms(t0))
        results["api: HTTP floor (GET /health, SDK keep-alive path)"] = summarize(health)
        warm.kill()
        warm.close()
        asyncio.run(bench_paired(settings, url, runs, results))
    bench_pools(settings, runs, results)


async def bench_paired(settings: ManagerSettings, url: str, runs: int, results: Results) -> None:
    """In-process vs over HTTP, alternating call by call: cold create -> first exec, and the exec round trip."""
    inproc_dir = settings.data_dir / "paired"
    inproc_dir.mkdir(parents=True, exist_ok=True)
    local = ManagerSettings(
        data_dir=inproc_dir,
        templates_dir=settings.template_root,
        cgroup_parent=f"{settings.cgroup_parent}-paired",
        keep_sandboxes_on_shutdown=False,
        # the daemon networks its sandboxes by default: so does this Manager (in a subnet of its own)
        network=NetworkSettings(subnet="10.201.0.0/16", table="bbpaired", if_prefix="bbpr"),
    )
    rows: dict[str, list[float]] = {
        f"{what}_{side}": []
        for what in ("create", "alone", "exec", "out_create", "out_exec")
        for side in ("local", "http")
    }
    async with Manager.open(local) as m:
        info = await m.create()
        sbx = await AsyncSandbox.create(base_url=url)
        try:
            for _ in range(3):  # warm both paths
                await m.exec(info.id, "true")
                await sbx.commands.run("true")

            async def cold_local() -> None:
                t0 = time.perf_counter()
                new = await m.create()
                alone = _ms(t0)
                r = await m.exec(new.id, "true")
                rows["create_local"].append(total := _ms(t0))
                rows["alone_local"].append(alone)
                rows["out_create_local"].append(_outside(total, r, new.timings))
                await m.destroy(new.id)

            async def cold_http() -> None:
                t0 = time.perf_counter()
                other = await AsyncSandbox.create(base_url=url)
                alone = _ms(t0)
                r = await other.commands.run("true")
                rows["create_http"].append(total := _ms(t0))
                rows["alone_http"].append(alone)
                rows["out_create_http"].append(_outside(total, r, other.info.timings))
                await other.kill()
                await other.close()

            for i in range(runs):
                # which side goes first alternates: the work each side leaves behind (a spare shell primed, a
                # teardown finishing) lands on the other side's measurement equally often
                for cold in (cold_local, cold_http) if i % 2 else (cold_http, cold_local):
                    await cold()
                for _ in range(4):
                    t0 = time.perf_counter()
                    r = await m.exec(info.id, "true")
                    rows["exec_local"].append(ms := _ms(t0))
                    rows["out_exec_local"].append(_outside(ms, r))
                    t0 = time.perf_counter()
                    res = await sbx.commands.run("true")
                    rows["exec_http"].append(ms := _ms(t0))
                    rows["out_exec_http"].append(_outside(ms, res))
            # sbx (and info) stay alive meanwhile: the SDK's connection to the daemon stays open, as for a client
            # that holds a sandbox
            rows.update(await _paired_warm(m, url, runs))
        finally:
            await sbx.kill()
            await sbx.close()
            await m.destroy(info.id)
    for what, label in (
        ("create", "cold create -> first exec"),
        ("alone", "cold create alone"),
        ("warm", "warm create (pool claim) -> first exec"),
        ("exec", "exec round trip (true)"),
    ):
        local_s, http_s = summarize(rows[f"{what}_local"]), summarize(rows[f"{what}_http"])
        results[f"paired: {label}, in-process Manager"] = local_s
        results[f"paired: {label}, async SDK over HTTP"] = http_s
        print(f"paired {label}: the API adds {http_s.p50 - local_s.p50:.2f} ms at p50", file=sys.stderr)
    floor = results["paired: HTTP floor: warm create -> first exec, async SDK against a null server"] = summarize(
        rows["floor_http"]
    )
    print(f"paired HTTP floor (a null server, same loop): {floor.p50:.2f} ms at p50", file=sys.stderr)
    # The same pairs without the variance of the work itself: each sample's time outside the Manager's own timers
    # (a create's phase total, an exec's agent round trip, both returned by the call), HTTP minus in-process, pair
    # by pair. The Manager's phases are the same code on both sides (and measure the same: docs/api.md).
    for what, label in (("create", "cold create -> first exec"), ("warm", "warm create (pool claim) -> first exec"),
                        ("exec", "exec round trip (true)")):  # fmt: skip
        local_o, http_o = rows[f"out_{what}_local"], rows[f"out_{what}_http"]
        added = summarize([h - loc for h, loc in zip(http_o, local_o, strict=True)])
        results[f"paired: {label}, outside the Manager's timers, in-process Manager"] = summarize(local_o)
        results[f"paired: {label}, outside the Manager's timers, async SDK over HTTP"] = summarize(http_o)
        results[f"paired: {label}, the API adds (outside the Manager's timers, pair by pair)"] = added
        print(f"paired {label}, outside the Manager's timers: the API adds {added.p50:.2f} ms at p50", file=sys.stderr)


PAIRED_POOL = 2  # members per side: the claim under test plus one


async def _pools_full(m: Manager, url: str) -> None:
    """Both pools (in-process and the daemon's) hold PAIRED_POOL ready members and boot none: polled, outside the
    timed regions, so no member boots in the background of a measurement."""
    deadline = time.monotonic() + 120
    while True:
        local = next(s for s in m.pool_statistics() if s.template == "default")
        remote = await AsyncSandbox.get_pool("default", base_url=url)
        if min(local.ready, remote.ready) >= PAIRED_POOL and local.booting == remote.booting == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the paired pools did not refill: in-process {local}, daemon {remote}")
        await asyncio.sleep(0.01)


async def _paired_warm(m: Manager, url: str, runs: int) -> dict[str, list[float]]:
    """Claim from a warm pool -> first command result, in-process vs over HTTP. Both sides get the same pool
    (size, resources) and both are full and idle before each pair; which side goes first alternates.

    Third, after the same wait, the same SDK calls against a null server (:mod:`null_http`): the floor that any
    HTTP API in another process costs here."""
    settings = {"min_size": PAIRED_POOL, "max_size": PAIRED_POOL, "target_free": PAIRED_POOL,
                "memory_mb": POOL_MEMORY_MB}  # fmt: skip
    await m.configure_pool(PoolConfig(template="default", **settings))
    await AsyncSandbox.configure_pool("default", **settings, base_url=url)
    rows: dict[str, list[float]] = {k: [] for k in ("warm_local", "warm_http", "out_warm_local", "out_warm_http")}

    async def local() -> None:
        t0 = time.perf_counter()
        info = await m.create(memory_mb=POOL_MEMORY_MB)
        r = await m.exec(info.id, "true")
        rows["warm_local"].append(ms := _ms(t0))
        rows["out_warm_local"].append(_outside(ms, r, info.timings))
        assert info.source == "warm", info.source
        await m.destroy(info.id)

    async def http() -> None:
        t0 = time.perf_counter()
        sbx = await AsyncSandbox.create(memory_mb=POOL_MEMORY_MB, base_url=url)
        r = await sbx.commands.run("true")
        rows["warm_http"].append(ms := _ms(t0))
        rows["out_warm_http"].append(_outside(ms, r, sbx.info.timings))
        try:
            assert sbx.info.source == "warm", sbx.info.source
        finally:
            await sbx.kill()
            await sbx.close()

    async def floor(null_url: str) -> None:
        t0 = time.perf_counter()
        sbx = await AsyncSandbox.create(memory_mb=POOL_MEMORY_MB, base_url=null_url)
        await sbx.commands.run("true")
        floor_ms.append(_ms(t0))
        await sbx.close()

    floor_ms: list[float] = []
    with null_daemon() as null_url:
        holder = await AsyncSandbox.create(base_url=null_url)  # keeps the SDK's connection to it open
        try:
            for i in range(runs + 2):  # the first two pairs warm both paths up
                await _pools_full(m, url)
                first, second = (local, http) if i % 2 else (http, local)
                await first()
                await _pools_full(m, url)
                await second()
                await _pools_full(m, url)
                await floor(null_url)
        finally:
            await holder.close()
            await m.remove_pool("default")
            await AsyncSandbox.remove_pool("default", base_url=url)
    return {"floor_http": floor_ms[2:], **{k: v[2:] for k, v in rows.items()}}


async def _async_exec(url: str, sandbox_id: str, n: int) -> list[float]:
    sbx = await AsyncSandbox.connect(sandbox_id, base_url=url)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await sbx.commands.run("true")
            out.append(_ms(t0))
    finally:
        await sbx.close()
    return out


# ---------------------------------------------------------------- warm pools

POOL_CONFIG = f"""
[pools.default]
min_size = {POOL_SIZE}
target_free = {POOL_SIZE}
max_size = {POOL_SIZE}
memory_mb = {POOL_MEMORY_MB}
max_parallel_boots = 4
"""


def wait_pool_full(url: str, want: int = POOL_SIZE, timeout: float = 300.0) -> None:
    """Poll GET /v1/pools/default until ``want`` members are ready and none boot (never inside a timed region)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as c:
        while True:
            s = c.get("/v1/pools/default").json()
            if s["ready"] >= want and s["booting"] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool did not refill to {want} within {timeout} s: {s}")
            time.sleep(0.02)


def _create_first(url: str, memory_mb: int) -> tuple[float, Sandbox]:
    t0 = time.perf_counter()
    sbx = Sandbox.create(memory_mb=memory_mb, base_url=url)
    result = sbx.commands.run("true")
    ms = _ms(t0)
    assert result.exit_code == 0
    return ms, sbx


def _sequential(url: str, n: int, *, warm: bool) -> list[float]:
    samples = []
    for _ in range(n):
        if warm:
            wait_pool_full(url)
        ms, sbx = _create_first(url, POOL_MEMORY_MB if warm else POOL_MEMORY_MB * 2)
        try:
            assert sbx.info.source == ("warm" if warm else "cold"), sbx.info.source
        finally:
            sbx.kill()
            sbx.close()
        samples.append(ms)
    return samples


async def _burst(url: str, n: int, memory_mb: int) -> tuple[float, list[float], list[str]]:
    """``n`` concurrent create -> first exec; returns (whole burst ms, per-sandbox ms, sources)."""

    async def one() -> tuple[float, AsyncSandbox]:
        t0 = time.perf_counter()
        sbx = await AsyncSandbox.create(memory_mb=memory_mb, base_url=url)
        try:
            r = await sbx.commands.run("true")
        except BaseException:
            await sbx.kill()
            await sbx.close()
            raise
        assert r.exit_code == 0
        return _ms(t0), sbx

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    whole = _ms(t0)
    sbxs = [d[1] for d in done if not isinstance(d, BaseException)]
    try:
        errors = [d for d in done if isinstance(d, BaseException)]
        if errors:
            raise errors[0]
        return whole, [d[0] for d in done if not isinstance(d, BaseException)], [s.info.source for s in sbxs]
    finally:
        await asyncio.gather(*(s.kill() for s in sbxs), return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sbxs), return_exceptions=True)


def bench_pools(settings: ManagerSettings, runs: int, results: Results) -> None:
    """Warm vs cold create -> first command result through the SDK, sequential and in bursts of 32."""
    n = max(MIN_SEQUENTIAL, runs)
    with running_daemon(settings, "pools", POOL_CONFIG) as url:
        wait_pool_full(url)
        _sequential(url, 3, warm=True)  # warm up the client side (imports, TLS context, first connections)
        results["pool: warm create -> first exec (SDK, sequential)"] = summarize(_sequential(url, n, warm=True))
        results["pool: cold create -> first exec (SDK, sequential)"] = summarize(_sequential(url, n, warm=False))
        for label, memory_mb in (("warm", POOL_MEMORY_MB), ("cold", POOL_MEMORY_MB * 2)):
            wholes: list[float] = []
            each: list[float] = []
            for _ in range(BURSTS):
                wait_pool_full(url)
                whole, per, sources = asyncio.run(_burst(url, POOL_SIZE, memory_mb))
                assert set(sources) == {label}, sources
                wholes.append(whole)
                each.extend(per)
            results[f"pool: {label} burst of {POOL_SIZE} (whole burst, async SDK)"] = summarize(wholes)
            results[f"pool: {label} burst of {POOL_SIZE} (each create -> first exec)"] = summarize(each)
        stats = httpx.get(url + "/v1/pools/default", timeout=30).json()
        print(
            f"pool stats: hits={stats['hits']} misses={stats['misses']} boots={stats['boots']} "
            f"claim p50={stats['claim_p50_ms']} ms p99={stats['claim_p99_ms']} ms",
            file=sys.stderr,
        )
