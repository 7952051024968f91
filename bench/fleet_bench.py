"""The fleet registry (branchbox.fleet.registry), in process: allocate (spread and pack), register/update,
release, list all; at 100, 1,000 and 10,000 nodes holding 10 templates (each node holds 5 of them, with a warm
pool state per template). Baseline in the same run: a plain scan of every node (the filter -> score -> select a
registry without indexes would do), so the figures say what the indexes buy on this machine's load.

Usage: python bench/fleet_bench.py [--sizes 100,1000,10000] [--ops N] [--json FILE] [--controller N]
Figures are microseconds per operation (p50/p95/p99 of single timed calls, perf_counter_ns).

``--controller N`` (root, the default template built, Ray installed) adds create through the controller vs
directly on the node, in the same run and interleaved one by one: a one-node Ray cluster (cluster_utils), a real
``branchbox serve --fleet`` daemon on it and ``branchbox fleet serve``; N creates each way (SDK over HTTP,
destroyed after each), with the controller's per-phase breakdown (allocate, node call, node create); then 3N
execs (``true``) and 1 KiB file reads each way in a sandbox on the node, which the controller forwards.
Milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.fleet.registry import Capacity, Registry, Request  # noqa: E402
from stats import summarize  # noqa: E402

TEMPLATES = [(f"t{i}", "container") for i in range(10)]


def capacity(rng: random.Random) -> Capacity:
    held = frozenset(rng.sample(TEMPLATES, 5))
    warm = {k: rng.choice([0, 0, 1, 4]) for k in held}
    return Capacity(rng.randint(16, 256) * 1024, rng.randint(8, 64) * 1000, rng.randint(0, 50), held, warm)


def build(n: int, policy: str = "spread", seed: int = 1) -> tuple[Registry, list[Capacity]]:
    rng = random.Random(seed)
    reg = Registry(stale_after=1e12, policy=policy)  # type: ignore[arg-type]
    caps = [capacity(rng) for _ in range(n)]
    for i, c in enumerate(caps):
        reg.register(f"node-{i}", f"http://10.0.{i // 250}.{i % 250}:7077", c, labels={"region": "eu"}, now=0.0)
    return reg, caps


def scan_allocate(reg: Registry, req: Request) -> str | None:
    """The baseline: every node, filtered and scored, as a registry without an index would."""
    key = (req.template, req.backend)
    best, best_score = None, None
    for v in reg._nodes.values():  # the same node objects the registry holds
        if key not in v.pushed.templates or v.draining or v.lost or v.mem < req.memory_mb or v.cpu < req.cpu_millis:
            continue
        score = (v.warm.get(key, 0) > 0, v.mem if reg.policy == "spread" else -v.mem, -v.order)
        if best_score is None or score > best_score:
            best, best_score = v.node_id, score
    return best


def timed(fn, arg_list) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    pc = time.perf_counter_ns
    for a in arg_list:
        t0 = pc()
        fn(a)
        out.append((pc() - t0) / 1e3)
    return out


def bench_size(n: int, ops: int) -> dict[str, dict[str, float]]:
    rng = random.Random(2)
    results: dict[str, dict[str, float]] = {}
    for policy in ("spread", "pack"):
        reg, _ = build(n, policy)
        reqs = [
            Request(*rng.choice(TEMPLATES), rng.choice([256, 512, 1024]), rng.choice([500, 1000])) for _ in range(ops)
        ]
        allocate = reg.allocate
        # allocate then release in batches of 100 (the fleet stays roughly as full as it started)
        samples_a: list[float] = []
        samples_r: list[float] = []
        for i in range(0, ops, 100):
            got: list = []
            add = got.append
            samples_a += timed(lambda q, add=add, allocate=allocate: add(allocate(q, now=0.0)), reqs[i : i + 100])
            samples_r += timed(reg.release, got)
        results[f"allocate {policy}"] = summarize(samples_a).as_dict()
        # CPU time of the thread per allocate (batches of 100, then released): what a host that is not shared
        # with other work would see, with the waits for a core that this machine's load adds left out
        cpu: list[float] = []
        for i in range(0, ops, 100):
            batch = reqs[i : i + 100]
            t0 = time.thread_time_ns()
            got = [allocate(q, now=0.0) for q in batch]
            cpu.append((time.thread_time_ns() - t0) / 1e3 / len(batch))
            for a in got:
                reg.release(a)
        results[f"allocate {policy} (CPU, batch mean)"] = summarize(cpu).as_dict()
        results[f"release ({policy})"] = summarize(samples_r).as_dict()
        scan_reqs = reqs[: max(50, min(ops, 200_000 // n))]
        results[f"baseline scan {policy}"] = summarize(
            timed(lambda q, reg=reg: scan_allocate(reg, q), scan_reqs)
        ).as_dict()
    reg, caps = build(n)
    rng2 = random.Random(3)
    seqs = {f"node-{i}": 0 for i in range(n)}

    def push(i: int) -> None:
        nid = f"node-{i}"
        seqs[nid] += 1
        reg.update(nid, caps[i], seq=seqs[nid], now=0.0)

    results["update (a push)"] = summarize(timed(push, [rng2.randrange(n) for _ in range(min(ops, 20_000))])).as_dict()
    fresh = Registry()
    results["register"] = summarize(
        timed(lambda i: fresh.register(f"x{i}", "u", caps[i % n], now=0.0), range(min(n, 10_000)))
    ).as_dict()
    reps = max(3, 2000 // n)
    lists = []
    for _ in range(reps):
        t1 = time.perf_counter_ns()
        reg.list()
        lists.append((time.perf_counter_ns() - t1) / 1e3)
    results["list all"] = summarize(lists).as_dict()
    return results


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check, what: str, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return got


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=f, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def one_node_fleet(templates: str) -> Iterator[tuple[str, str]]:
    """(daemon URL, controller URL) of a one-node fleet; all of it stopped at the end."""
    import httpx  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    root = Path("/var/tmp") / f"fleet-bench-{secrets.token_hex(4)}"
    root.mkdir(mode=0o711, parents=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBOX_")}
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    dport, cport = _port(), _port()
    procs = []
    try:
        denv = {
            **env,
            "BRANCHBOX_CGROUP_PARENT": f"fleetbench-{root.name}",
            "BRANCHBOX_NETWORK_SUBNET": "10.231.0.0/20",
            "BRANCHBOX_NETWORK_DNS_UPSTREAM": "127.0.0.1:9",
            "BRANCHBOX_KEEP_SANDBOXES_ON_SHUTDOWN": "false",
            "BRANCHBOX_LOG_LEVEL": "warning",
            "BRANCHBOX_FLEET_ADDRESS": cluster.address,
            "BRANCHBOX_FLEET_NAME": "bench",
            "BRANCHBOX_FLEET_RAY_NODE_ID": cluster.head_node.node_id,
            "BRANCHBOX_FLEET_MEMORY_MB": "16384",
        }
        (root / "data").mkdir(mode=0o711)
        cli = [sys.executable, "-m", "branchbox.cli"]
        serve = ["serve", "--port", str(dport), "--data-dir", str(root / "data"), "--templates-dir", templates]
        procs.append(_spawn(cli + serve, denv, root / "daemon.log"))
        fleet = ["fleet", "serve", "--address", cluster.address, "--port", str(cport), "--log-level", "warning"]
        procs.append(_spawn(cli + fleet, env, root / "controller.log"))
        durl, curl = f"http://127.0.0.1:{dport}", f"http://127.0.0.1:{cport}"

        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                nodes = httpx.get(curl + "/v1/fleet/nodes", timeout=2).json()
                return bool(nodes) and nodes[0]["state"] == "ready"
            return False

        _wait(ready, "the node ready on the controller")
        yield durl, curl
    finally:
        for p in reversed(procs):
            _stop(p)
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def bench_controller(runs: int, templates: str) -> dict[str, dict[str, float]]:
    from branchbox.sdk import Sandbox  # noqa: PLC0415

    direct: list[float] = []
    via: list[float] = []
    phases: dict[str, list[float]] = {"fleet_allocate": [], "fleet_node_call": [], "total": [], "fleet_total": []}
    with one_node_fleet(templates) as (durl, curl):
        for url in (durl, curl):  # warm both paths (first connections, the zygote's spares)
            Sandbox.create(base_url=url, memory_mb=256).kill()
        for _ in range(runs):
            for url, out in ((durl, direct), (curl, via)):
                t0 = time.perf_counter()
                sbx = Sandbox.create(base_url=url, memory_mb=256)
                out.append((time.perf_counter() - t0) * 1e3)
                if url == curl:
                    for k, samples in phases.items():
                        samples.append(sbx.info.timings[k])
                sbx.kill()
                sbx.close()
        # a sandbox's own routes, forwarded by the controller to its node: exec and a small file read
        calls: dict[str, list[float]] = {}
        on_node = Sandbox.create(base_url=durl, memory_mb=256)
        through = Sandbox.create(base_url=curl, memory_mb=256)
        try:
            for sbx in (on_node, through):
                sbx.files.write("/tmp/small", b"x" * 1024)
            for _ in range(runs * 3):
                for where, sbx in (("directly on the node", on_node), ("through the controller", through)):
                    t0 = time.perf_counter()
                    sbx.commands.run("true")
                    calls.setdefault(f"exec {where} (SDK)", []).append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    sbx.files.read("/tmp/small", format="bytes")
                    calls.setdefault(f"files.read 1 KiB {where} (SDK)", []).append((time.perf_counter() - t0) * 1e3)
        finally:
            on_node.kill()
            through.kill()
    res = {"create directly on the node (SDK)": summarize(direct).as_dict(),
           "create through the controller (SDK)": summarize(via).as_dict()}  # fmt: skip
    res.update({f"  phase {k}": summarize(v).as_dict() for k, v in phases.items()})
    res.update({k: summarize(v).as_dict() for k, v in sorted(calls.items())})
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--ops", type=int, default=20_000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--controller", type=int, default=0, metavar="N", help="N creates each way (0: skip)")
    ap.add_argument(
        "--templates-dir", default=os.environ.get("BRANCHBOX_TEST_TEMPLATES", "/var/lib/branchbox/templates")
    )
    args = ap.parse_args()
    print(f"load: {os.getloadavg()}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    if args.controller:
        out["controller"] = bench_controller(args.controller, args.templates_dir)
        print("\ncreate -> sandbox returned; exec and read round trips; one node, interleaved (ms)")
        print(f"{'path':48} {'p50':>9} {'p95':>9} {'p99':>9} {'n':>7}")
        for name, s in out["controller"].items():
            print(f"{name:48} {s['p50']:9.2f} {s['p95']:9.2f} {s['p99']:9.2f} {s['n']:7d}")
    for n in (int(s) for s in args.sizes.split(",") if s):
        out[str(n)] = bench_size(n, args.ops)
        print(f"\n{n} nodes, 10 templates (us per op)")
        print(f"{'operation':28} {'p50':>9} {'p95':>9} {'p99':>9} {'n':>7}")
        for name, s in out[str(n)].items():
            print(f"{name:28} {s['p50']:9.2f} {s['p95']:9.2f} {s['p99']:9.2f} {s['n']:7d}")
    print(f"load: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
