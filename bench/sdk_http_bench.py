"""The SDK's HTTP client stack against httpx, in one run against one real daemon (not part of make bench).

Each row runs one SDK call and the same HTTP request through a plain ``httpx.Client`` / ``httpx.AsyncClient``
(keep-alive, one client for the whole run), alternately, sample by sample, so both see the same machine load:

- exec round trip (``POST /v1/sandboxes/{id}/commands``, ``true``), sync and async;
- small files: ``files.read`` (a query string), ``files.write`` (a raw body), ``files.list``, 1 KiB;
- streams: ``files.download`` and ``files.write`` of a file object (chunked upload), 64 MiB, in ms and MiB/s.

Run it with another checkout's SDK on ``PYTHONPATH`` to compare versions of the SDK in one sitting:

    PYTHONPATH=src:bench .venv/bin/python bench/sdk_http_bench.py [--n 300] [--big 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from api_bench import running_daemon
from branchbox.core.settings import ManagerSettings
from branchbox.sdk import AsyncSandbox, Sandbox
from stats import Summary, summarize

SMALL = os.urandom(1024)
BIG_MIB = 64


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _pair(samples: dict[str, list[float]], name: str, sdk: Callable[[], Any], raw: Callable[[], Any], n: int) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        sdk()
        samples.setdefault(f"{name}: SDK", []).append(_ms(t0))
        t0 = time.perf_counter()
        raw()
        samples.setdefault(f"{name}: httpx", []).append(_ms(t0))


async def _apair(
    samples: dict[str, list[float]], name: str, sdk: Callable[[], Awaitable[Any]], raw: Callable[[], Awaitable[Any]],
    n: int,
) -> None:  # fmt: skip
    for _ in range(n):
        t0 = time.perf_counter()
        await sdk()
        samples.setdefault(f"{name}: SDK", []).append(_ms(t0))
        t0 = time.perf_counter()
        await raw()
        samples.setdefault(f"{name}: httpx", []).append(_ms(t0))


def _ok(resp: httpx.Response) -> httpx.Response:
    resp.raise_for_status()
    return resp


def _pieces(f: io.BufferedReader) -> Iterator[bytes]:
    while chunk := f.read(1 << 20):
        yield chunk


def bench_sync(url: str, n: int, big: int, big_file: Path, samples: dict[str, list[float]]) -> None:
    with Sandbox.create(base_url=url) as sbx, httpx.Client(base_url=url, timeout=120) as c:
        sid = sbx.sandbox_id
        base = f"/v1/sandboxes/{sid}"
        sbx.files.write("/tmp/small", SMALL)
        for _ in range(20):  # warm both (connections, FastAPI's first requests)
            sbx.commands.run("true")
            _ok(c.post(base + "/commands", json={"cmd": "true"}))
        _pair(samples, "sync exec", lambda: sbx.commands.run("true"),
              lambda: _ok(c.post(base + "/commands", json={"cmd": "true"})), n)  # fmt: skip
        _pair(samples, "sync files.read 1 KiB", lambda: sbx.files.read("/tmp/small", format="bytes"),
              lambda: _ok(c.get(base + "/files", params={"path": "/tmp/small"})).content, n)  # fmt: skip
        _pair(samples, "sync files.write 1 KiB", lambda: sbx.files.write("/tmp/w", SMALL),
              lambda: _ok(c.put(base + "/files", params={"path": "/tmp/w"}, content=SMALL)), n)  # fmt: skip
        _pair(samples, "sync files.list", lambda: sbx.files.list("/tmp"),
              lambda: _ok(c.get(base + "/files/list", params={"path": "/tmp", "depth": "1"})).json(), n)  # fmt: skip

        def upload_sdk() -> None:
            with big_file.open("rb") as f:
                sbx.files.write("/tmp/big", f)

        def upload_raw() -> None:
            with big_file.open("rb") as f:
                _ok(c.put(base + "/files", params={"path": "/tmp/big"}, content=_pieces(f)))

        def download_sdk() -> None:
            assert sbx.files.download("/tmp/big", io.BytesIO()) == BIG_MIB << 20

        def download_raw() -> None:  # as the SDK's download does: 1 MiB pieces into a file object
            out = io.BytesIO()
            with c.stream("GET", base + "/files", params={"path": "/tmp/big"}) as resp:
                resp.raise_for_status()
                for part in resp.iter_bytes(1 << 20):
                    out.write(part)
            assert out.tell() == BIG_MIB << 20

        _pair(samples, f"sync upload {BIG_MIB} MiB", upload_sdk, upload_raw, big)
        _pair(samples, f"sync download {BIG_MIB} MiB", download_sdk, download_raw, big)


async def bench_async(url: str, n: int, big: int, samples: dict[str, list[float]]) -> None:
    sbx = await AsyncSandbox.create(base_url=url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            base = f"/v1/sandboxes/{sbx.sandbox_id}"
            await sbx.files.write("/tmp/small", SMALL)

            async def raw_exec() -> None:
                _ok(await c.post(base + "/commands", json={"cmd": "true"}))

            async def raw_read() -> None:
                _ok(await c.get(base + "/files", params={"path": "/tmp/small"}))

            async def raw_write() -> None:
                _ok(await c.put(base + "/files", params={"path": "/tmp/w"}, content=SMALL))

            async def sdk_download() -> None:
                assert await sbx.files.download("/tmp/big", io.BytesIO()) == BIG_MIB << 20

            async def raw_download() -> None:
                out = io.BytesIO()
                async with c.stream("GET", base + "/files", params={"path": "/tmp/big"}) as resp:
                    resp.raise_for_status()
                    async for part in resp.aiter_bytes(1 << 20):
                        out.write(part)
                assert out.tell() == BIG_MIB << 20

            for _ in range(20):
                await sbx.commands.run("true")
                await raw_exec()
            await _apair(samples, "async exec", lambda: sbx.commands.run("true"), raw_exec, n)
            await _apair(
                samples, "async files.read 1 KiB", lambda: sbx.files.read("/tmp/small", format="bytes"), raw_read, n
            )
            await _apair(samples, "async files.write 1 KiB", lambda: sbx.files.write("/tmp/w", SMALL), raw_write, n)
            await sbx.files.write("/tmp/big", os.urandom(BIG_MIB << 20))
            await _apair(samples, f"async download {BIG_MIB} MiB", sdk_download, raw_download, big)
    finally:
        await sbx.kill()
        await sbx.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="samples per small-request row and side")
    ap.add_argument("--big", type=int, default=8, help=f"samples per {BIG_MIB} MiB stream row and side")
    ap.add_argument("--json", type=Path, help="write the summaries here")
    args = ap.parse_args()
    templates = Path(os.environ.get("BRANCHBOX_TEST_TEMPLATES", "/var/lib/branchbox/templates"))
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="sdk-http-bench-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o711)
        big_file = Path(tmp) / "big"
        big_file.write_bytes(os.urandom(BIG_MIB << 20))
        settings = ManagerSettings(data_dir=Path(tmp), templates_dir=templates, cgroup_parent="bbsdkhttpbench")
        with running_daemon(settings, "sdkhttp") as url:
            bench_sync(url, args.n, args.big, big_file, samples)
            asyncio.run(bench_async(url, args.n, args.big, samples))
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    import branchbox.sdk  # noqa: PLC0415 - which checkout's SDK ran

    print(f"host: {load}\nsdk: {Path(branchbox.sdk.__file__).parent}")
    out: dict[str, Any] = {"host": load, "rows": {}}
    for name, values in samples.items():
        s: Summary = summarize(values)
        rate = f"  {BIG_MIB / (s.p50 / 1e3):7.1f} MiB/s at p50" if "MiB" in name else ""
        print(f"{name:40s} n={s.n:4d} p50={s.p50:8.2f} p95={s.p95:8.2f} p99={s.p99:8.2f} ms{rate}")
        out["rows"][name] = s.as_dict()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
