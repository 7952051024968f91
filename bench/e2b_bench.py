"""The E2B facade's cost: the unmodified ``e2b`` SDK against a real ``branchbox serve`` next to branchbox's own SDK
against the same daemon, interleaved one call by one so both see the same machine load (not part of make bench).

Rows (milliseconds, p50/p95/p99): create -> first command result, and the exec round trip of a command in a
running sandbox, each through the two SDKs and, to tell the facade's own cost from the SDKs' client-side costs
(the e2b SDK builds new HTTP clients per sandbox and per control-plane call), through one plain httpx client
against the two APIs (native ``POST /v1/sandboxes/{id}/commands`` vs envd's Connect ``process.Process/Start``).
Through the SDKs both sides run the very same command line (``/bin/bash -l -c true``: the e2b SDK's
``commands.run`` wraps every command in a login bash, so the native side is given the same argv); the plain-client
rows run ``/bin/true``, so the ~50 ms of a login bash does not hide the facade's own cost (goal: <= 1 ms at p50).

    PYTHONPATH=src .venv/bin/python bench/e2b_bench.py [--n 200] [--creates 40]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from api_bench import running_daemon
from branchbox.core.settings import ManagerSettings
from branchbox.sdk import Sandbox as NativeSandbox
from stats import Summary, summarize

CMD = ["/bin/bash", "-l", "-c", "true"]
FAST = ["/bin/true"]
_START = json.dumps({"process": {"cmd": FAST[0], "args": FAST[1:]}}).encode()


def _raw_e2b_exec(c: httpx.Client, url: str, sid: str, token: str) -> None:
    """One Connect server-streaming Start of CMD, read to its end-of-stream envelope."""
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token,
               "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}  # fmt: skip
    body = c.post(f"{url}/process.Process/Start", content=struct.pack(">BI", 0, len(_START)) + _START,
                  headers=headers).content  # fmt: skip
    flags, end = 0, 0
    while end < len(body):
        flags, size = struct.unpack(">BI", body[end : end + 5])
        end += 5 + size
    if flags != 2 or b'"end"' not in body:
        raise RuntimeError(f"unexpected Start answer: {body[-200:]!r}")


def _raw_native_exec(c: httpx.Client, url: str, sid: str) -> None:
    r = c.post(f"{url}/v1/sandboxes/{sid}/commands", json={"cmd": FAST})
    r.raise_for_status()


def _row(name: str, s: Summary) -> str:
    return f"{name:44s} n={s.n:4d} p50={s.p50:8.2f} p95={s.p95:8.2f} p99={s.p99:8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="exec round trips per side")
    ap.add_argument("--creates", type=int, default=40, help="create -> first command per side")
    args = ap.parse_args()
    templates = Path(os.environ.get("BRANCHBOX_TEST_TEMPLATES", "/var/lib/branchbox/templates"))
    with tempfile.TemporaryDirectory(prefix="e2b-bench-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o711)
        settings = ManagerSettings(data_dir=Path(tmp), templates_dir=templates, cgroup_parent="bbe2bbench")
        config = 'network_subnet = "10.214.64.0/20"\n'
        with running_daemon(settings, "e2b", config) as url:
            os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY="bb_unchecked_on_loopback")
            from e2b import Sandbox as E2BSandbox  # noqa: PLC0415 (after the environment points it at the daemon)

            kinds = ("native_create", "e2b_create", "native_exec", "e2b_exec", "raw_native_exec", "raw_e2b_exec")
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(3):  # warm both paths (connections, imports, FastAPI's first requests)
                with NativeSandbox.create(base_url=url) as n:
                    n.commands.run(CMD)
                e = E2BSandbox.create("default")
                e.commands.run("true")
                e.kill()
            for _ in range(args.creates):
                t0 = time.perf_counter()
                n = NativeSandbox.create(base_url=url)
                n.commands.run(CMD)
                samples["native_create"].append((time.perf_counter() - t0) * 1e3)
                n.kill()
                t0 = time.perf_counter()
                e = E2BSandbox.create("default")
                e.commands.run("true")
                samples["e2b_create"].append((time.perf_counter() - t0) * 1e3)
                e.kill()
            n = NativeSandbox.create(base_url=url)
            e = E2BSandbox.create("default")
            try:
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    n.commands.run(CMD)
                    samples["native_exec"].append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    e.commands.run("true")
                    samples["e2b_exec"].append((time.perf_counter() - t0) * 1e3)
                with httpx.Client() as c:
                    token = e._envd_access_token or ""
                    for _ in range(args.n):
                        t0 = time.perf_counter()
                        _raw_native_exec(c, url, n.sandbox_id)
                        samples["raw_native_exec"].append((time.perf_counter() - t0) * 1e3)
                        t0 = time.perf_counter()
                        _raw_e2b_exec(c, url, e.sandbox_id, token)
                        samples["raw_e2b_exec"].append((time.perf_counter() - t0) * 1e3)
            finally:
                n.kill()
                e.kill()
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"host: {load}")
    s = {k: summarize(v) for k, v in samples.items()}
    print(_row("native SDK: create -> first command", s["native_create"]))
    print(_row("e2b SDK:    create -> first command", s["e2b_create"]))
    print(_row("native SDK: exec round trip", s["native_exec"]))
    print(_row("e2b SDK:    exec round trip", s["e2b_exec"]))
    print(_row("httpx, native API: /bin/true round trip", s["raw_native_exec"]))
    print(_row("httpx, E2B facade: /bin/true round trip", s["raw_e2b_exec"]))
    for what in ("create", "exec", "raw_exec"):
        if what == "raw_exec":
            d = s["raw_e2b_exec"].p50 - s["raw_native_exec"].p50
            print(f"facade - native API at p50 (same client): {d:+.2f} ms")
            continue
        d = s[f"e2b_{what}"].p50 - s[f"native_{what}"].p50
        print(f"e2b - native at p50 ({what}): {d:+.2f} ms")


if __name__ == "__main__":
    main()
