"""A Dockerfile build with branchbox (`branchbox template build -f`) vs `docker build` of the same file, same run.

    python bench/dockerfile_bench.py [--runs 8]

Both start from the same busybox-only rootfs (tests/rootfs_fixtures.py): `branchbox template import` into the
bench daemon's private templates dir, `docker import` into a private dockerd (its own data root and socket, no
bridge, no iptables: nothing of the host changes). Each round builds, interleaved, branchbox then docker:

* cold: a new `--build-arg NONCE=...` consumed by the first RUN, so every step after FROM runs again (the same
  trick makes Docker miss its cache),
* cached: the same build again (every step CACHED / "Using cache").

Timings are wall-clock of the CLI processes (client + daemon + sandbox/containers), p50/p95/p99 over the runs;
`bb_sdk_cached` is the cached build through the SDK from the bench's own process (no Python CLI start: the
branchbox CLI is a Python program, docker's a Go binary).
The branchbox daemon's data dir is on /var/tmp (ext4 here: the overlay storage driver copies a sandbox's upper
layer per snapshot); docker uses overlay2 on the same filesystem. Needs root, dockerd and busybox-static.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.stats import summarize  # noqa: E402
from tests.rootfs_fixtures import build_busybox_rootfs, write_busybox_tar  # noqa: E402

from branchbox.sdk import Template  # noqa: E402

DOCKERFILE = """\
FROM {base}
ARG NONCE=0
RUN echo "nonce $NONCE" > /nonce && mkdir -p /app
COPY files/ /app/files/
RUN cat /app/files/* | wc -c > /app/size
ENV APP=/app MODE=bench
WORKDIR /app
RUN ls files > listing && echo done
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ok(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _wait(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:  # a separate process: nothing to wait on but its answer
        try:
            if callable(check) and check():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start in {timeout} s")
        time.sleep(0.1)


@contextlib.contextmanager
def branchbox_daemon(work: Path) -> Iterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBOX_")}
    env.update(PYTHONPATH=str(ROOT / "src"), BRANCHBOX_CGROUP_PARENT=f"dfbench-{secrets.token_hex(3)}",
               BRANCHBOX_LOG_LEVEL="warning")  # fmt: skip
    argv = [sys.executable, "-m", "branchbox.cli", "serve", "--port", str(port),
            "--data-dir", str(work / "data"), "--templates-dir", str(work / "templates")]  # fmt: skip
    with open(work / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _ok(["curl", "-sf", url + "/health"]), "the branchbox daemon")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def docker_daemon(work: Path) -> Iterator[str]:
    d = work / "dockerd"
    d.mkdir()
    sock = f"unix://{d}/docker.sock"
    argv = ["dockerd", "-H", sock, "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "dockerd.pid"), "--iptables=false", "--ip6tables=false", "--ip-forward=false",
            "--ip-masq=false", "--bridge=none", "--userland-proxy=false", "--log-level=warn"]  # fmt: skip
    with open(d / "dockerd.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait(lambda: _ok(["docker", "-H", sock, "info"]), "dockerd")
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-R", str(d / "exec")], capture_output=True, check=False)
        subprocess.run(["umount", "-R", str(d / "data")], capture_output=True, check=False)


def _timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    elapsed = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) under /var/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dockerfile-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    try:
        rootfs = work / "busybox"
        build_busybox_rootfs(rootfs)
        tar = work / "busybox.tar"
        write_busybox_tar(rootfs, tar)
        ctx = work / "ctx"
        (ctx / "files").mkdir(parents=True)
        for i in range(50):
            (ctx / "files" / f"f{i:02d}.txt").write_bytes(os.urandom(2048).hex().encode())
        cli = [sys.executable, "-m", "branchbox.cli"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBOX_")}
        env["PYTHONPATH"] = str(ROOT / "src")
        imp = [*cli, "template", "import", str(tar), "--name", "bench-busybox"]
        imp += ["--templates-dir", str(work / "templates")]
        subprocess.run(imp, env=env, check=True, capture_output=True)
        (ctx / "Dockerfile.bb").write_text(DOCKERFILE.format(base="bench-busybox"))
        (ctx / "Dockerfile.docker").write_text(DOCKERFILE.format(base="bench-busybox:1"))
        (ctx / ".dockerignore").write_text("Dockerfile.*\n")
        keys = ("bb_cold", "docker_cold", "bb_cached", "docker_cached", "bb_sdk_cached")
        samples: dict[str, list[float]] = {k: [] for k in keys}
        with branchbox_daemon(work) as url, docker_daemon(work) as sock:
            docker = ["docker", "-H", sock]
            subprocess.run([*docker, "import", str(tar), "bench-busybox:1"], check=True, capture_output=True)
            bb = [*cli, "--url", url, "template", "build", "-f", str(ctx / "Dockerfile.bb"), "--name", "bench-app"]
            dk = [*docker, "build", "--network", "none", "-q", "-f", str(ctx / "Dockerfile.docker"),
                  "-t", "bench-app:1"]  # fmt: skip
            denv = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: Debian's docker.io has no buildx
            for _ in range(2):  # warm-up: the first sandbox/container of each, and the import's first use
                nonce = secrets.token_hex(4)
                _timed([*bb, "--build-arg", f"NONCE={nonce}", str(ctx)], env)
                _timed([*dk, "--build-arg", f"NONCE={nonce}", str(ctx)], denv)
                Template.build(ctx, name="bench-app", dockerfile=ctx / "Dockerfile.bb", build_args={"NONCE": nonce},
                               base_url=url)  # fmt: skip
            for _ in range(args.runs):
                nonce = secrets.token_hex(4)
                ms, out = _timed([*bb, "--build-arg", f"NONCE={nonce}", str(ctx)], env)
                assert "CACHED" not in out.split("Step 3/")[1], out
                samples["bb_cold"].append(ms)
                samples["docker_cold"].append(_timed([*dk, "--build-arg", f"NONCE={nonce}", str(ctx)], denv)[0])
                ms, out = _timed([*bb, "--build-arg", f"NONCE={nonce}", str(ctx)], env)
                assert out.count("CACHED") == 8, out
                samples["bb_cached"].append(ms)
                samples["docker_cached"].append(_timed([*dk, "--build-arg", f"NONCE={nonce}", str(ctx)], denv)[0])
                t0 = time.perf_counter()  # the same cached build from this process (no CLI start): the daemon's part
                Template.build(ctx, name="bench-app", dockerfile=ctx / "Dockerfile.bb", build_args={"NONCE": nonce},
                               base_url=url)  # fmt: skip
                samples["bb_sdk_cached"].append((time.perf_counter() - t0) * 1000)
        load = os.getloadavg()
        report = {k: summarize(v).as_dict() for k, v in samples.items()}
        print(json.dumps({"load": [round(x, 1) for x in load], "ms": report}, indent=2))
        print(f"{'build (ms)':16} {'p50':>8} {'p95':>8} {'p99':>8}")
        for k, s in report.items():
            print(f"{k:16} {s['p50']:8.0f} {s['p95']:8.0f} {s['p99']:8.0f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
