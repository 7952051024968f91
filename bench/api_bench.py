"""API-level numbers for ``make bench``: the SDK over HTTP against a real ``branchbox serve`` on loopback.

Compare with the in-process ``core:`` rows of the same run; the goal is <= 1 ms p50 added by the API.
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
from collections.abc import Iterator
from pathlib import Path

from branchbox.core.settings import ManagerSettings
from branchbox.sdk import AsyncSandbox, Sandbox
from stats import Summary, summarize

Results = dict[str, Summary]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_daemon(settings: ManagerSettings) -> Iterator[str]:
    """A daemon subprocess on a free port (warning-level logs, sandboxes stopped on exit); yields its URL."""
    data_dir = settings.data_dir / "api"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o711)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBOX_")}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        BRANCHBOX_CGROUP_PARENT=f"{settings.cgroup_parent}-api",
        BRANCHBOX_KEEP_SANDBOXES_ON_SHUTDOWN="false",
        BRANCHBOX_LOG_LEVEL="warning",
    )
    argv = [
        sys.executable, "-m", "branchbox.cli", "serve", "--port", str(port),
        "--data-dir", str(data_dir), "--templates-dir", str(settings.template_root),
    ]  # fmt: skip
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
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


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
            warm._http.client.get("/health")
            health.append(_ms(t0))
        results["api: HTTP floor (GET /health, keep-alive)"] = summarize(health)
        warm.kill()
        warm.close()


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
