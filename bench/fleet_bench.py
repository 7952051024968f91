"""The fleet registry (branchbox.fleet.registry), in process: allocate (spread and pack), register/update,
release, list all; at 100, 1,000 and 10,000 nodes holding 10 templates (each node holds 5 of them, with a warm
pool state per template). Baseline in the same run: a plain scan of every node (the filter -> score -> select a
registry without indexes would do), so the figures say what the indexes buy on this machine's load.

Usage: python bench/fleet_bench.py [--sizes 100,1000,10000] [--ops N] [--json FILE]
Figures are microseconds per operation (p50/p95/p99 of single timed calls, perf_counter_ns).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--ops", type=int, default=20_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in (int(s) for s in args.sizes.split(",")):
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
