"""Git workspaces against ``git clone --depth=1``, in the same run, on a repository of 20 000 files and 300 commits
served by ``git daemon`` on loopback.

* baseline ``git clone --depth=1`` (fresh directory each run), and the same with ``-c checkout.workers=4``
  (the parallel checkout workspaces use: shows how much of the difference is only that)
* first workspace (a repository URL the cache has never seen: shallow fetch, checkout, layer, sandbox)
* repeated workspace for the same commit (``commit=``: no server), to ready; and ready + a clean ``git status``
* repeated workspace for a branch (``branch=``: one ``git ls-remote`` per request)
* workspace for a new commit of a known repository (5 changed files)
* first ``git status --porcelain`` inside a workspace

Called from bench/run.py as ``bench_git(settings, runs, results)``; alone: ``python bench/git_bench.py``.
Baselines and first workspaces alternate so load from elsewhere on the machine hits both alike. Trees are
removed only at the end (a large ``rm`` slows the following writes on ext4).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from branchbox.core.manager import Manager  # noqa: E402
from branchbox.core.settings import ManagerSettings  # noqa: E402
from branchbox.workspaces.gitcmd import base_env  # noqa: E402
from branchbox.workspaces.service import WorkspaceService  # noqa: E402
from branchbox.workspaces.testing import GitDaemon, commit_file, generate_repo  # noqa: E402
from stats import Summary, summarize  # noqa: E402

Results = dict[str, Summary]


def _clone(url: str, dest: Path, *opts: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["git", *opts, "clone", "-q", "--depth=1", url, str(dest)], check=True, env=base_env())
    return (time.perf_counter() - t0) * 1e3


async def _status_ms(m: Manager, sid: str, path: str) -> float:
    t0 = time.perf_counter()
    r = await m.exec(sid, ["git", "status", "--porcelain"], cwd=path, timeout=120)
    ms = (time.perf_counter() - t0) * 1e3
    if r.exit_code != 0 or r.stdout:
        raise RuntimeError(f"git status in workspace is not clean: {r.stdout[:200]!r} {r.stderr[:200]!r}")
    return ms


async def bench_git(settings: ManagerSettings, runs: int, results: Results) -> None:
    root = settings.data_dir / "git-bench"
    shutil.rmtree(root, ignore_errors=True)
    served, scratch = root / "served", root / "scratch"
    served.mkdir(parents=True)
    scratch.mkdir()
    generate_repo(served / "repo.git")
    daemon = GitDaemon(served).start()
    # the git server is on loopback, a blocked range for workspace fetches unless allowed (workspaces/egress.py)
    loopback = dataclasses.replace(settings.workspaces, allow_cidrs=("127.0.0.0/8",))
    s = dataclasses.replace(settings, data_dir=root / "data", workspaces=loopback)
    n_first = max(3, min(8, runs // 8))
    try:
        m = Manager(s)
        ws = m.add_service(WorkspaceService(m))  # as the daemon runs it (daemon/serve.py)
        async with m:
            clone_ms: list[float] = []
            clone4_ms: list[float] = []
            first_ms: list[float] = []
            first_phases: dict[str, list[float]] = {}
            status_first: list[float] = []
            for i in range(n_first):  # alternate: baseline, then a never-seen URL of the same repository
                os.symlink(served / "repo.git", served / f"repo-{i}.git")
                url = daemon.url(f"repo-{i}.git")
                clone_ms.append(await asyncio.to_thread(_clone, url, scratch / f"clone-{i}"))
                workers = ("-c", "checkout.workers=4")  # the parallel checkout the workspaces use
                clone4_ms.append(await asyncio.to_thread(_clone, url, scratch / f"clone4-{i}", *workers))
                t0 = time.perf_counter()
                w = await ws.create(url, branch="main")
                first_ms.append((time.perf_counter() - t0) * 1e3)
                for k in ("resolve", "fetch", "checkout", "layer", "sandbox"):
                    first_phases.setdefault(k, []).append(w.timings.get(k, 0.0))
                status_first.append(await _status_ms(m, w.sandbox_id or "", w.path))
                await ws.delete(w.id)
                await ws.wait_background()  # the history fetch, off the measured path
            results["git: baseline git clone --depth=1"] = summarize(clone_ms)
            results["git: baseline git -c checkout.workers=4 clone --depth=1"] = summarize(clone4_ms)
            results["git: first workspace (never-seen repository)"] = summarize(first_ms)
            for k, v in first_phases.items():
                results[f"git: first workspace phase {k}"] = summarize(v)
            results["git: first git status --porcelain in a workspace"] = summarize(status_first)

            url = daemon.url("repo-0.git")
            rev = ["git", "-C", str(served / "repo.git"), "rev-parse", "main"]
            res = await asyncio.to_thread(subprocess.run, rev, check=True, capture_output=True, env=base_env())
            tip = res.stdout.decode().strip()
            warm = await ws.create(url, commit=tip)  # builds the detached-HEAD layer once
            await ws.delete(warm.id)
            ready_ms: list[float] = []
            ready_status_ms: list[float] = []
            branch_ms: list[float] = []
            for _ in range(runs):
                t0 = time.perf_counter()
                w = await ws.create(url, commit=tip)
                ready_ms.append((time.perf_counter() - t0) * 1e3)
                assert w.cached
                await _status_ms(m, w.sandbox_id or "", w.path)
                ready_status_ms.append((time.perf_counter() - t0) * 1e3)
                await ws.delete(w.id)
                t0 = time.perf_counter()
                w = await ws.create(url, branch="main")
                branch_ms.append((time.perf_counter() - t0) * 1e3)
                await ws.delete(w.id)
            results["git: repeated workspace, same commit (ready)"] = summarize(ready_ms)
            results["git: repeated workspace, same commit (ready + clean git status)"] = summarize(ready_status_ms)
            results["git: repeated workspace, branch (ls-remote + ready)"] = summarize(branch_ms)

            new_ms: list[float] = []
            new_phases: dict[str, list[float]] = {}
            for i in range(n_first):
                await asyncio.to_thread(commit_file, served / "repo.git", "main", f"d000/f{i:05d}.txt",
                                        f"bench change {i}\n", message=f"bench {i}")  # fmt: skip
                t0 = time.perf_counter()
                w = await ws.create(url, branch="main")
                new_ms.append((time.perf_counter() - t0) * 1e3)
                assert not w.cached
                for k in ("resolve", "fetch", "checkout", "layer", "sandbox"):
                    new_phases.setdefault(k, []).append(w.timings.get(k, 0.0))
                await _status_ms(m, w.sandbox_id or "", w.path)
                await ws.delete(w.id)
            results["git: workspace for a new commit of a known repository"] = summarize(new_ms)
            for k, v in new_phases.items():
                results[f"git: new commit phase {k}"] = summarize(v)
            await ws.wait_background()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BRANCHBOX_DATA_DIR", "/var/lib/branchbox")))
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    bench = args.data_dir / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    os.chmod(bench, 0o711)
    settings = ManagerSettings(data_dir=bench, templates_dir=args.data_dir / "templates",
                               cgroup_parent="branchbox-bench-git", keep_sandboxes_on_shutdown=False)  # fmt: skip
    results: Results = {}
    asyncio.run(bench_git(settings, args.runs, results))
    for name, r in results.items():
        print(f"{name:70s} n={r.n:3d} p50={r.p50:9.1f} p95={r.p95:9.1f} p99={r.p99:9.1f} ms")


if __name__ == "__main__":
    main()
