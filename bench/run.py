"""branchbox benchmarks, side by side with baselines measured in the same run.

Usage: python bench/run.py [--data-dir DIR] [--runs N] [--only NAME[,NAME]] [--no-docker]
Writes bench/results/<UTC timestamp>.json and bench/results/latest.md (a Markdown table).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.core.manager import Manager  # noqa: E402
from branchbox.core.settings import ManagerSettings  # noqa: E402
from branchbox.images.store import TemplateStore  # noqa: E402
from stats import Summary, summarize  # noqa: E402

Results = dict[str, Summary]


def timed_subprocess(argv: list[str], runs: int) -> list[float]:
    """Wall time of a whole command, in ms, spawned from this (already warm) process."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def timed_async(fn: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def bench_core(settings: ManagerSettings, runs: int, results: Results) -> None:
    """In-process: cold create -> first exec result, exec round trip, destroy."""
    async with Manager.open(settings) as m:
        warm = await m.create()  # start the backend's helper process before measuring
        await m.exec(warm.id, "true")
        create_first_exec: list[float] = []
        destroy: list[float] = []
        phases: dict[str, list[float]] = {}
        for _ in range(runs):
            t0 = time.perf_counter()
            sbx = await m.create()
            r = await m.exec(sbx.id, "true")
            create_first_exec.append((time.perf_counter() - t0) * 1e3)
            assert r.exit_code == 0
            for k, v in sbx.timings.items():
                phases.setdefault(k, []).append(v)
            t0 = time.perf_counter()
            await m.destroy(sbx.id)
            destroy.append((time.perf_counter() - t0) * 1e3)
        results["core: cold create -> first exec"] = summarize(create_first_exec)
        results["core: destroy"] = summarize(destroy)
        for k, v in phases.items():
            results[f"core: create phase {k}"] = summarize(v)
        results["core: exec round trip (true)"] = summarize(
            await timed_async(lambda: m.exec(warm.id, "true"), runs * 4)
        )
        results["core: exec round trip (argv ['true'])"] = summarize(
            await timed_async(lambda: m.exec(warm.id, ["true"]), runs * 4)
        )
        await m.destroy(warm.id)


def bench_baselines(rootfs: Path, runs: int, results: Results) -> None:
    results["baseline: unshare --pid --mount --net --uts --ipc --fork true"] = summarize(
        timed_subprocess(["unshare", "--pid", "--mount", "--net", "--uts", "--ipc", "--fork", "true"], runs)
    )
    if shutil.which("bwrap"):
        results["baseline: bwrap --unshare-all (template rootfs) true"] = summarize(
            timed_subprocess(
                ["bwrap", "--unshare-all", "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
                 "--tmpfs", "/tmp", "/bin/true"],
                runs,
            )
        )  # fmt: skip


class Dockerd:
    """A dockerd started by hand for the run (no systemd here), without iptables or a bridge, then cleaned up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Dockerd:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "dockerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-forward=false", "--bridge=none", "--data-root",
             str(self.root / "data"), "--exec-root", str(self.root / "exec"), "--pidfile",
             str(self.root / "dockerd.pid"), "-H", f"unix://{self.sock}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.docker("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not start; see {self.root / 'dockerd.log'}")

    def docker(self, *args: str, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", "-H", f"unix://{self.sock}", *args], check=check, capture_output=True, input=stdin
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["umount", "-R", str(self.root)], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def bench_docker(rootfs: Path, runs: int, results: Results) -> None:
    if not shutil.which("dockerd"):
        print("docker baseline skipped: dockerd is not installed (make bench installs docker.io)")
        return
    with Dockerd(Path("/var/tmp/branchbox-bench-docker")) as d:
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], check=True, capture_output=True).stdout
        d.docker("import", "-", "branchbox-bench:latest", stdin=tar)
        base = ["docker", "-H", f"unix://{d.sock}", "run", "--rm", "--network", "none", "branchbox-bench:latest"]
        subprocess.run([*base, "true"], check=True, capture_output=True)  # first run warms the image
        results["baseline: docker run --rm (template image) true"] = summarize(timed_subprocess([*base, "true"], runs))
        bench_docker_commit(d, max(3, runs // 6), results)
        bench_docker_cp(d, min(runs, 20), results)


def bench_docker_commit(d: Dockerd, runs: int, results: Results) -> None:
    """The snapshot baseline: ``docker commit`` of a container holding the 20k-file tree, and ``docker run`` of the
    committed image (a fork, the docker way)."""
    from snapshot_bench import TREE  # noqa: PLC0415 - the same tree the snapshot section uses

    name = "branchbox-bench-tree"
    d.docker("rm", "-f", name, check=False)
    d.docker("run", "--name", name, "--network", "none", "branchbox-bench:latest", "python3", "-c", TREE)
    commit: list[float] = []
    run_from: list[float] = []
    try:
        for i in range(runs):
            image = f"branchbox-bench-snap:{i}"
            t0 = time.perf_counter()
            d.docker("commit", name, image)
            commit.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            d.docker("run", "--rm", "--network", "none", image, "true")
            run_from.append((time.perf_counter() - t0) * 1e3)
    finally:
        d.docker("rm", "-f", name, check=False)
    results["baseline: docker commit (20k-file container)"] = summarize(commit)
    results["baseline: docker run --rm of the committed image, true"] = summarize(run_from)


def bench_docker_cp(d: Dockerd, runs: int, results: Results) -> None:
    """The directory-transfer baseline: ``docker cp`` of the files section's tree into a container and back."""
    from files_bench import make_tree  # noqa: PLC0415 - the same tree the files section uses

    name = "branchbox-bench-cp"
    work = Path(tempfile.mkdtemp(prefix="branchbox-bench-cp-", dir="/var/tmp"))  # as the files section
    d.docker("rm", "-f", name, check=False)
    try:
        make_tree(work / "tree")
        d.docker("create", "--name", name, "--network", "none", "branchbox-bench:latest", "true")
        into: list[float] = []
        out: list[float] = []
        for i in range(runs):
            t0 = time.perf_counter()
            d.docker("cp", str(work / "tree"), f"{name}:/t{i}")
            into.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            d.docker("cp", f"{name}:/t{i}", str(work / f"back{i}"))
            out.append((time.perf_counter() - t0) * 1e3)
            shutil.rmtree(work / f"back{i}")
    finally:
        d.docker("rm", "-f", name, check=False)
        shutil.rmtree(work, ignore_errors=True)
    results["baseline: docker cp of the files section's tree into a container"] = summarize(into)
    results["baseline: docker cp of it back out"] = summarize(out)


def _ms(value: float) -> str:
    """Two decimals; three below 1 ms, where the API's figures and the host probe live."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def write_results(results: Results, meta: dict[str, object]) -> Path:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {"meta": meta, "results": {k: v.as_dict() for k, v in results.items()}}
    path = out_dir / f"{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# branchbox benchmarks ({stamp})",
        "",
        f"Host: {meta['host']}. Times in ms over n runs.",
        "",
        "| benchmark | n | p50 | p95 | p99 | mean |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        cells = " | ".join(_ms(v) for v in (s.p50, s.p95, s.p99, s.mean))
        lines.append(f"| {name} | {s.n} | {cells} |")
    (out_dir / "latest.md").write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BRANCHBOX_BENCH_RUNS", "60")))
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated: host, core, api, files, snapshots, network, microvm, git, baselines, docker",
    )
    ap.add_argument("--no-docker", action="store_true")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    bench_data = args.data_dir / "bench"
    bench_data.mkdir(parents=True, exist_ok=True)
    os.chmod(bench_data, 0o711)
    settings = ManagerSettings(
        data_dir=bench_data,
        templates_dir=args.data_dir / "templates",
        # in-process Managers claim nothing: a name of this data dir's own keeps two benches (two --data-dir)
        # out of each other's cgroups
        cgroup_parent="branchbox-bench-" + hashlib.sha256(str(bench_data.resolve()).encode()).hexdigest()[:8],
        keep_sandboxes_on_shutdown=False,
    )
    store = TemplateStore(settings.template_root)
    tpl = asyncio.run(store.ensure_default())
    rootfs = store.rootfs(tpl.digest)
    results: Results = {}
    if want("host"):
        from host_probe import bench_host  # noqa: PLC0415 - optional section

        bench_host(args.runs, results)
    if want("core"):
        asyncio.run(bench_core(settings, args.runs, results))
    if want("api"):
        from api_bench import bench_api  # noqa: PLC0415 - optional section

        bench_api(settings, args.runs, results)
    if want("snapshots"):
        from snapshot_bench import bench_snapshots  # noqa: PLC0415 - optional section

        asyncio.run(bench_snapshots(settings, min(args.runs, 20), results))  # 20k-file copies: bounded
    if want("network"):
        from net_bench import bench_network  # noqa: PLC0415 - optional section

        bench_network(settings, args.runs, results)
    if want("microvm"):
        from microvm_bench import bench_microvm  # noqa: PLC0415 - optional section (QEMU)

        asyncio.run(bench_microvm(settings, min(args.runs, 15), results))  # TCG boots: bounded
    if want("files"):
        from files_bench import bench_files  # noqa: PLC0415 - optional section

        bench_files(settings, min(args.runs, 20), results)
    if want("git"):
        from git_bench import bench_git  # noqa: PLC0415 - optional section

        asyncio.run(bench_git(settings, min(args.runs, 30), results))  # includes git clone --depth=1 baselines
    if want("baselines"):
        bench_baselines(rootfs, args.runs, results)
    if want("docker") and not args.no_docker:
        bench_docker(rootfs, args.runs, results)
    meta = {"host": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "runs": args.runs}
    path = write_results(results, meta)
    print((HERE / "results" / "latest.md").read_text())
    print(f"written: {path}")


if __name__ == "__main__":
    main()
