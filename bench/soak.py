"""Soak benchmark (issue 21.6): N concurrent async SDK clients against one daemon for a bounded time.

Each client loops until the time is up: create a sandbox, run a command, write a file and read it back, every
``--fork-every``-th cycle fork it into two children (each reads the file, then is destroyed), destroy it. The
daemon is a ``branchbox serve`` this script starts (its own data dir ``DATA/bench/soak``, port, cgroup parent;
subnet, table and veth prefix are its own claims) and stops at the end.

Reported: sustained creates/s (forks counted apart), p50/p95/p99 of every call, errors by call and code (goal:
none), the daemon's RSS at start and end and its slope (least squares over samples taken every few seconds,
per minute and per create), and what is left on the host once every sandbox is destroyed: processes and cgroups
under the daemon's parent, veths of its prefix, elements in its nftables sets, mounts and loop devices under its
data dir, sandbox and layer dirs, the daemon's fds and threads (goal: as at the start); then, after the daemon's
shutdown, its table and cgroup parent (goal: gone).

    .venv/bin/python bench/soak.py --duration 300 --clients 8      # or: make soak SOAK_DURATION=300

Results go to ``bench/results/soak-<stamp>.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api_bench import running_daemon
from branchbox.core.settings import ManagerSettings
from branchbox.sdk import AsyncSandbox, SandboxError
from stats import summarize

HERE = Path(__file__).resolve().parent
CGROUP_ROOT = Path("/sys/fs/cgroup")
NFT_SETS = ("owned", "offline", "allow", "deny", "pins", "pins2", "dpins")


@dataclass
class Tally:
    """What the clients saw: call latencies (ms) by call, errors by (call, code), counts."""

    ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    creates: int = 0
    forks: int = 0
    cycles: int = 0
    checks_failed: int = 0

    async def timed(self, call: str, coro: Any) -> Any:
        t0 = time.perf_counter()
        try:
            out = await coro
        except SandboxError as exc:
            self.errors[(call, exc.code)] += 1
            raise
        except Exception as exc:
            self.errors[(call, type(exc).__name__)] += 1
            raise
        self.ms[call].append((time.perf_counter() - t0) * 1e3)
        return out


async def _destroy(tally: Tally, sbx: AsyncSandbox) -> None:
    try:
        await tally.timed("destroy", sbx.kill())
    finally:
        await sbx.close()


async def _cycle(tally: Tally, url: str, n: int, fork_every: int) -> None:
    sbx = await tally.timed("create", AsyncSandbox.create(base_url=url, request_timeout=120))
    tally.creates += 1
    try:
        r = await tally.timed("exec", sbx.commands.run(f"echo {n}", request_timeout=60))
        payload = os.urandom(2048).hex()
        await tally.timed("files.write", sbx.files.write("/tmp/soak.txt", payload, request_timeout=60))
        back = await tally.timed("files.read", sbx.files.read("/tmp/soak.txt", request_timeout=60))
        if r.stdout != f"{n}\n" or back != payload:
            tally.checks_failed += 1
        if fork_every and n % fork_every == 0:
            children = await tally.timed("fork (2 children)", sbx.fork(count=2, request_timeout=120))
            for child in children:
                if isinstance(child, Exception):
                    tally.errors[("fork child", getattr(child, "code", type(child).__name__))] += 1
                    continue
                tally.forks += 1
                try:
                    got = await tally.timed("exec (fork child)", child.commands.run("cat /tmp/soak.txt"))
                    if got.stdout != payload:
                        tally.checks_failed += 1
                finally:
                    await _destroy(tally, child)
    finally:
        await _destroy(tally, sbx)
    tally.cycles += 1


async def _client(tally: Tally, url: str, deadline: float, fork_every: int, seed: int) -> None:
    n = seed
    while time.monotonic() < deadline:
        n += 1
        with contextlib.suppress(Exception):  # counted in the tally; the client goes on
            await _cycle(tally, url, n, fork_every)


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


async def _sample_rss(pid: int, tally: Tally, samples: list[tuple[float, int, int]], every: float) -> None:
    t0 = time.monotonic()
    while True:
        samples.append((time.monotonic() - t0, tally.creates + tally.forks, _status(pid)["VmRSS"]))
        await asyncio.sleep(every)


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3 or len(set(xs)) < 2:
        return float("nan")
    return statistics.linear_regression(xs, ys).slope


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def _cgroups(parent: str) -> tuple[int, int]:
    """(sandbox cgroups, spare-shell cgroups) under ``parent``, each counted once over all hierarchies."""
    found: set[str] = set()
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        if Path(top).name == parent:
            for inner, subdirs, _ in os.walk(top):
                found.update(os.path.relpath(f"{inner}/{d}", top) for d in subdirs)
            dirs.clear()
    shells = sum("shell-" in path for path in found)
    return len(found) - shells, shells


def _processes(parent: str) -> int:
    """Processes in a sandbox cgroup under ``parent`` (spare shells not counted)."""
    n = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            text = Path(f"/proc/{p}/cgroup").read_text()
        except OSError:
            continue
        n += f"/{parent}/" in text and f"/{parent}/shell-" not in text
    return n


def _nft_elements(table: str) -> dict[str, int]:
    out = {}
    for name in NFT_SETS:
        text = _sh("nft", "-j", "list", "set", "inet", table, name)
        try:
            items = json.loads(text)["nftables"]
        except (ValueError, KeyError):
            out[name] = -1  # no such set (the table is gone)
            continue
        elems = [i["set"].get("elem", []) for i in items if "set" in i]
        out[name] = sum(len(e) for e in elems)
    return out


def host_state(data_dir: Path, pid: int | None) -> dict[str, Any]:
    """What the daemon of ``data_dir`` has on the host right now."""
    names = json.loads((data_dir / "host.json").read_text())
    sandbox_cgroups, shell_cgroups = _cgroups(names["cgroup_parent"])
    links = [line.split(":")[1].strip().split("@")[0] for line in _sh("ip", "-o", "link").splitlines()]
    prefix = names["if_prefix"]
    where = str(data_dir)
    mounts = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" {where}/" in ln]
    loops = [ln for ln in _sh("losetup", "-l", "-n", "-O", "BACK-FILE").splitlines() if where in ln]
    state: dict[str, Any] = {
        "processes": _processes(names["cgroup_parent"]),
        "cgroups": sandbox_cgroups,
        "spare shell cgroups": shell_cgroups,
        "veths": sum(name.startswith(prefix) for name in links),
        "nft elements": _nft_elements(names["table"]),
        "table": names["table"] in _sh("nft", "list", "tables"),
        "mounts": len(mounts),
        "loop devices": len(loops),
        "sandbox dirs": len(list((data_dir / "sandboxes").glob("*"))) if (data_dir / "sandboxes").exists() else 0,
        "layer dirs": len(list((data_dir / "layers").glob("*"))) if (data_dir / "layers").exists() else 0,
    }
    if pid is not None:
        state["daemon fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        state["daemon threads"] = _status(pid)["Threads"]
    return state


def _daemon_pid(data_dir: Path) -> int:
    return int((data_dir / "daemon.lock").read_text().split()[0])


async def soak(url: str, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    pid = _daemon_pid(data_dir)
    warm = await AsyncSandbox.create(base_url=url)  # first boot and imports, outside the figures
    await warm.commands.run("true")
    await warm.kill()
    await warm.close()
    await asyncio.sleep(args.settle)
    before = host_state(data_dir, pid)
    rss_start = _status(pid)["VmRSS"]
    tally = Tally()
    samples: list[tuple[float, int, int]] = []
    sampler = asyncio.create_task(_sample_rss(pid, tally, samples, args.sample_every))
    t0 = time.monotonic()
    deadline = t0 + args.duration
    load_start = os.getloadavg()
    await asyncio.gather(*(_client(tally, url, deadline, args.fork_every, i * 1_000_000) for i in range(args.clients)))
    wall = time.monotonic() - t0
    load_end = os.getloadavg()
    sampler.cancel()
    rss_end = _status(pid)["VmRSS"]
    await asyncio.sleep(args.settle)  # destroys finish their background work (netns, subvolumes)
    after = host_state(data_dir, pid)
    rss_settled = _status(pid)["VmRSS"]
    secs, creates, rss = zip(*samples, strict=True) if samples else ((), (), ())
    half = len(samples) // 2
    return {
        "duration_s": round(wall, 1),
        "clients": args.clients,
        "cycles": tally.cycles,
        "creates": tally.creates,
        "fork children": tally.forks,
        "creates_per_s": round(tally.creates / wall, 2),
        "sandboxes_per_s (creates + fork children)": round((tally.creates + tally.forks) / wall, 2),
        "calls": {k: summarize(v).as_dict() for k, v in sorted(tally.ms.items())},
        "errors": {f"{call}: {code}": n for (call, code), n in sorted(tally.errors.items())},
        "checks_failed": tally.checks_failed,
        "rss_kib": {
            "start": rss_start,
            "end": rss_end,
            "settled": rss_settled,
            "peak (VmHWM)": _status(pid)["VmHWM"],
            "slope per minute": round(_slope(list(secs), list(rss)) * 60, 1),
            "slope per sandbox": round(_slope(list(creates), list(rss)), 3),
            # the second half alone: growth that only warms up (allocator arenas, caches) flattens there
            "slope per sandbox, 2nd half": round(_slope(list(creates[half:]), list(rss[half:])), 3),
            "samples": len(samples),
            "series (s, sandboxes, KiB)": samples,
        },
        "load": {"start": load_start, "end": load_end},
        "host before": before,
        "host after": after,
    }


def _table(doc: dict[str, Any]) -> str:
    r = doc["result"]
    lines = [
        f"# soak ({doc['stamp']}): {r['clients']} clients, {r['duration_s']} s, load {r['load']['start'][0]:.1f}"
        f" -> {r['load']['end'][0]:.1f}",
        "",
        f"cycles {r['cycles']}, creates {r['creates']} ({r['creates_per_s']}/s), fork children {r['fork children']},"
        f" errors {sum(r['errors'].values())} {r['errors'] or ''}, failed checks {r['checks_failed']}",
        "",
        "| call | n | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for call, s in r["calls"].items():
        lines.append(f"| {call} | {s['n']} | {s['p50']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | {s['max']:.1f} |")
    rss = r["rss_kib"]
    lines += [
        "",
        f"daemon RSS: start {rss['start'] / 1024:.1f} MiB, end {rss['end'] / 1024:.1f} MiB, settled"
        f" {rss['settled'] / 1024:.1f} MiB, peak {rss['peak (VmHWM)'] / 1024:.1f} MiB; slope"
        f" {rss['slope per minute']} KiB/min, {rss['slope per sandbox']} KiB/sandbox, 2nd half"
        f" {rss['slope per sandbox, 2nd half']} KiB/sandbox ({rss['samples']} samples)",
        "",
        "| on the host | before | after | after shutdown |",
        "|---|---|---|---|",
    ]
    gone = doc["after shutdown"]
    for key, value in r["host before"].items():
        lines.append(f"| {key} | {value} | {r['host after'].get(key)} | {gone.get(key, '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent SDK clients (default 8)")
    ap.add_argument("--fork-every", type=int, default=4, help="fork every n-th cycle of a client (0: never)")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait before each host inventory")
    args = ap.parse_args()
    random.seed(0)
    bench_data = args.data_dir / "bench"
    bench_data.mkdir(parents=True, exist_ok=True)
    os.chmod(bench_data, 0o711)
    settings = ManagerSettings(
        data_dir=bench_data,
        templates_dir=args.data_dir / "templates",
        cgroup_parent="branchbox-bench",
        keep_sandboxes_on_shutdown=False,
    )
    data_dir = bench_data / "soak"
    with running_daemon(settings, name="soak") as url:
        result = asyncio.run(soak(url, data_dir, args))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "stamp": stamp,
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "args": {k: str(v) for k, v in vars(args).items()},
        "result": result,
        "after shutdown": host_state(data_dir, None),
    }
    out = HERE / "results" / f"soak-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(_table(doc))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
