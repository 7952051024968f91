"""Directory transfers for ``make bench``: a repository-like tree (1000 files, ~6 MiB) into and out of a sandbox
through the SDK over HTTP, as one tar each way (``files.upload_dir`` / ``files.download_dir``), next to writing it
file by file (what the API offered before) in the same run. ``docker cp`` of the same tree is the baseline, in
``bench_docker`` (run.py).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

from api_bench import running_daemon
from branchbox.core.settings import ManagerSettings
from branchbox.sdk import Sandbox
from stats import Summary, summarize

Results = dict[str, Summary]
TREE_FILES = 1000


def make_tree(root: Path) -> int:
    """1000 files in 50 directories: mostly a few KiB (source files), a few of 256 KiB; returns the bytes."""
    rng = random.Random(7)
    total = 0
    for i in range(TREE_FILES):
        d = root / f"pkg{i % 50:02d}" / ("sub" if i % 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = 256 * 1024 if i % 100 == 0 else rng.randint(200, 8000)
        (d / f"mod{i:04d}.py").write_bytes(rng.randbytes(size))
        total += size
    return total


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def bench_files(settings: ManagerSettings, runs: int, results: Results) -> None:
    work = Path(tempfile.mkdtemp(prefix="branchbox-bench-files-", dir="/var/tmp"))  # /tmp is slower here
    try:
        tree = work / "tree"
        size = make_tree(tree)
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        label = f"{TREE_FILES}-file tree, {size / 2**20:.1f} MiB"
        with running_daemon(settings, name="files") as url, Sandbox.create(base_url=url) as sbx:
            up, down, per_file = [], [], []
            for i in range(runs):
                t0 = time.perf_counter()
                made = sbx.files.upload_dir(tree, f"/work/t{i}")
                up.append(_ms(t0))
                assert made.files == TREE_FILES
                t0 = time.perf_counter()
                sbx.files.download_dir(f"/work/t{i}", work / f"back{i}")
                down.append(_ms(t0))
                shutil.rmtree(work / f"back{i}")
                sbx.files.remove(f"/work/t{i}", recursive=True)
            for i in range(max(3, runs // 4)):  # 1000 round trips each: bounded
                t0 = time.perf_counter()
                for f in files:
                    sbx.files.write(f"/work/p{i}/{f.relative_to(tree)}", f.read_bytes())
                per_file.append(_ms(t0))
                sbx.files.remove(f"/work/p{i}", recursive=True)
        results[f"files: upload a {label} (upload_dir: one tar, SDK over HTTP)"] = summarize(up)
        results["files: download it (download_dir: one tar, SDK over HTTP)"] = summarize(down)
        results[f"files: upload it file by file (files.write x {TREE_FILES}, SDK over HTTP)"] = summarize(per_file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
