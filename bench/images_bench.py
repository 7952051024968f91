"""Image import (issue 25): `TemplateStore.import_image` from a local registry, cold and cached, side by side with
the floor of the same run (`skopeo copy` of the same image from the same registry into an OCI layout, which
every import includes), and with `docker pull` + `docker create` of it from the same registry by a dockerd the bench
starts for itself (tests/oci_images.dockerd: its own sockets and roots, no iptables or bridge) when docker.io is
installed.

The image: the default template's rootfs (Debian 12 + python3, git, ... ~330 MB, owners unshifted) as a gzip base
layer plus a small top layer (image A), and the same base with another top layer (image B: a shared base). Pushed
once to a docker-registry on loopback. Rows (ms, p50/p95/p99 of --runs):

- ``skopeo copy (floor)``: a fresh layout dir each run: the whole download
- ``import cold``: a fresh store each run: download, verify, unpack both layers, clone
- ``import cached``: the same image again under another name (blobs and stacks cached)
- ``import shared base``: image B into a store holding A: the base stack is reused, one small layer unpacked
- ``clone: btrfs snapshot`` vs ``clone: cp -a --reflink=auto``: making a template rootfs from a cached stack
- ``CPU`` rows: CPU time (user + system, ms) of the cold import (this process's threads + skopeo) and of the pull +
  create (the bench's dockerd with its containerd and helpers, + the docker CLI). On a shared host the wall times
  mostly measure the scheduler; CPU time is what an import costs whatever the load.

Run: ``python bench/images_bench.py [--data-dir /var/lib/branchbox] [--runs 5]`` (root; the store is made under
DATA/bench/images, the btrfs data dir `make` prepares).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from tests.oci_images import Entry, dir_tar, dockerd, registry, tar_bytes, write_layout  # noqa: E402

from branchbox.images.oci_fetch import FetchOptions  # noqa: E402
from branchbox.images.oci_import import clone_tree  # noqa: E402
from branchbox.images.store import TemplateStore  # noqa: E402
from branchbox.storage.btrfs import delete_subvolume, is_subvolume  # noqa: E402
from stats import Summary, summarize  # noqa: E402

Results = dict[str, Summary]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _cpu_self() -> float:
    """CPU seconds of this process (all threads) and of its reaped children (skopeo, zstd, the docker CLI)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_tree(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants, each with its reaped children (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def _dockerd_pid(host: str) -> int:
    return int((Path(host[len("unix://") :]).parent / "dockerd.pid").read_text())


def _rm(path: Path) -> None:
    if is_subvolume(path):
        delete_subvolume(path)
    shutil.rmtree(path, ignore_errors=True)


def bench_images(data_dir: Path, runs: int, results: Results) -> None:
    default = TemplateStore(data_dir / "templates")
    base_root = default.rootfs("default")
    host_base = int(default.metadata("default")["idmap"]["host_base"])
    work = data_dir / "bench" / "images"
    _rm(work)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        base = dir_tar(base_root, id_offset=host_base)
        top_a = tar_bytes([Entry("etc/motd", data=b"image A\n"), Entry("usr/bin/.wh.apt")])
        top_b = tar_bytes([Entry("etc/motd", data=b"image B\n"), Entry("opt/b", data=b"b" * 4096)])
        write_layout(
            work / "a", [base, top_a], config={"Env": ["LANG=C.UTF-8"], "WorkingDir": "/work", "Cmd": ["/bin/bash"]}
        )
        write_layout(
            work / "b", [base, top_b], config={"Env": ["LANG=C.UTF-8"], "WorkingDir": "/work", "Cmd": ["/bin/bash"]}
        )
        print(f"images written in {_ms(t0) / 1e3:.1f} s (base layer {len(base) / 1e6:.0f} MB uncompressed)")
        docker = contextlib.ExitStack()
        host = docker.enter_context(dockerd()) if shutil.which("dockerd") else None
        with docker, registry(Path(tempfile.mkdtemp(prefix="bb-img-reg-", dir="/var/tmp"))) as reg:
            reg.push(f"oci:{work / 'a'}:latest", "bench/a:1")
            reg.push(f"oci:{work / 'b'}:latest", "bench/b:1")
            ref_a, ref_b = reg.ref("bench/a:1"), reg.ref("bench/b:1")
            opts = FetchOptions(tls_verify=False)
            keys = ("floor", "cold", "cached", "shared", "docker", "cold_cpu", "docker_cpu")
            rows: dict[str, list[float]] = {k: [] for k in keys}
            for i in range(runs):  # interleaved, so load drifts hit every row alike
                layout = work / f"floor-{i}"
                t0 = time.perf_counter()
                subprocess.run(
                    ["skopeo", "copy", "--quiet", "--src-tls-verify=false", ref_a, f"oci:{layout}:img"], check=True
                )
                rows["floor"].append(_ms(t0))
                shutil.rmtree(layout)
                store = TemplateStore(work / f"store-{i}")
                t0, c0 = time.perf_counter(), _cpu_self()
                asyncio.run(store.import_image(ref_a, name="a", options=opts))
                rows["cold"].append(_ms(t0))
                rows["cold_cpu"].append((_cpu_self() - c0) * 1e3)
                t0 = time.perf_counter()
                asyncio.run(store.import_image(ref_a, name="a2", options=opts))
                rows["cached"].append(_ms(t0))
                t0 = time.perf_counter()
                asyncio.run(store.import_image(ref_b, name="b", options=opts))
                rows["shared"].append(_ms(t0))
                assert store.metadata("b")["image"]["layers_cached"] == 1
                if host is not None:  # 127.0.0.0/8 registries are plain HTTP for dockerd by default
                    d, name = ["docker", "-H", host], ref_a[len("docker://") :]
                    daemon = _dockerd_pid(host)
                    t0, c0 = time.perf_counter(), _cpu_self() + _cpu_tree(daemon)
                    subprocess.run([*d, "pull", "-q", name], check=True, capture_output=True)
                    cid = subprocess.run(
                        [*d, "create", "--network", "none", name], check=True, capture_output=True, text=True
                    ).stdout
                    rows["docker"].append(_ms(t0))
                    rows["docker_cpu"].append((_cpu_self() + _cpu_tree(daemon) - c0) * 1e3)
                    subprocess.run([*d, "rm", cid.strip()], check=False, capture_output=True)
                    subprocess.run([*d, "rmi", name], check=False, capture_output=True)
                for p in store.root.iterdir():
                    if p.name == "layers":
                        for stack in p.iterdir():
                            _rm(stack)
                _rm(store.root)
            names = {
                "floor": "images: skopeo copy from the registry (floor)",
                "cold": "images: import cold (fresh store)",
                "cached": "images: import cached (same image again)",
                "shared": "images: import shared base (1 new layer)",
                "docker": "images: docker pull + docker create",
                "cold_cpu": "images: CPU of import cold",
                "docker_cpu": "images: CPU of docker pull + create",
            }
            for key, label in names.items():
                if rows[key]:
                    results[label] = summarize(rows[key])
        # clone strategies on this filesystem, from one stack of the base layer
        store = TemplateStore(work / "clone-store")
        asyncio.run(store.import_image(f"oci:{work / 'a'}:latest", name="a"))
        stack = next(p for p in (store.root / "layers").iterdir() if p.is_dir())
        snap, copy = [], []
        for i in range(runs):
            dest = work / f"clone-{i}"
            t0 = time.perf_counter()
            clone_tree(stack, dest)
            snap.append(_ms(t0))
            _rm(dest)
            t0 = time.perf_counter()
            subprocess.run(["cp", "-a", "--reflink=auto", "--", str(stack), str(dest)], check=True)
            copy.append(_ms(t0))
            _rm(dest)
        kind = "btrfs snapshot" if is_subvolume(stack) else "cp -a --reflink=auto (not btrfs)"
        results[f"images: clone a stack: {kind}"] = summarize(snap)
        results["images: clone a stack: cp -a --reflink=auto"] = summarize(copy)
        for stack in (store.root / "layers").iterdir():
            _rm(stack)
    finally:
        for p in work.glob("*/layers/*"):
            _rm(p)
        _rm(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} (1/5/15 min)")
    results: Results = {}
    bench_images(args.data_dir, args.runs, results)
    print(f"{'':52} {'n':>3} {'p50':>10} {'p95':>10} {'p99':>10}  ms")
    for name, s in results.items():
        print(f"{name:52} {s.n:>3} {s.p50:>10.1f} {s.p95:>10.1f} {s.p99:>10.1f}")
    print(f"load: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} (1/5/15 min)")


if __name__ == "__main__":
    main()
