"""Cgroup v1 and v2 handling with real cgroups and real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchbox.backends.container import cgroups as cg_mod

pytestmark = pytest.mark.root

UNIFIED = Path("/sys/fs/cgroup/unified")


def _wait_until(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2]


@pytest.fixture
def layout() -> Iterator[cg_mod.Cgroups]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    parent = f"bbtest-{uuid.uuid4().hex[:8]}"
    cg = cg_mod.detect(parent)
    cg.ensure_parents()
    yield cg
    for sid in cg.list_ids():
        cg.kill(sid)
        _wait_until(lambda sid=sid: cg.remove(sid))
    for p in cg.parents.values():
        with contextlib.suppress(OSError):
            p.rmdir()


@pytest.fixture
def v2() -> Iterator[cg_mod.CgroupsV2]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        root = UNIFIED
    if not (root / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 hierarchy mounted")
    cg = cg_mod.CgroupsV2(root, f"bbtest-{uuid.uuid4().hex[:8]}")
    cg.ensure_parents()
    yield cg
    for sid in cg.list_ids():
        cg.kill(sid)
        _wait_until(lambda sid=sid: cg.remove(sid))
    with contextlib.suppress(OSError):
        cg.parent.rmdir()


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


def test_detect_matches_host() -> None:
    cg = cg_mod.detect("x")
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        assert cg.version == 2
    else:
        assert cg.version == 1
        assert {"memory", "pids", "freezer"} <= set(cg.parents)
        # Nested under this process's own cgroup of each controller.
        own = cg_mod._own_paths()
        assert str(cg.parents["memory"]).endswith(own["memory"].rstrip("/") + "/x")


def test_create_limits_join_kill_remove(layout: cg_mod.Cgroups) -> None:
    dirs = layout.create("sbx1", 0.5, 64, 33)
    if layout.version == 1:
        assert (dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(64 * 1024 * 1024)
        assert (dirs["pids"] / "pids.max").read_text().strip() == "33"
        assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    proc = _sleeper()
    try:
        layout.join("sbx1", proc.pid)
        assert layout.pids("sbx1") == [proc.pid]
        assert layout.list_ids() == {"sbx1"}
        assert not layout.remove("sbx1")  # busy while the process lives
        layout.kill("sbx1")
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert _wait_until(lambda: layout.remove("sbx1"))
        assert not layout.exists("sbx1")
        assert layout.list_ids() == set()
    finally:
        proc.kill()
        proc.wait()


def test_create_twice_fails(layout: cg_mod.Cgroups) -> None:
    layout.create("dup", 1.0, 64, 10)
    with pytest.raises(FileExistsError):
        layout.create("dup", 1.0, 64, 10)
    assert layout.exists("dup")
    assert layout.remove("dup")


def test_freeze_thaw(layout: cg_mod.Cgroups) -> None:
    if layout.version == 1 and "freezer" not in layout.parents:
        pytest.skip("no freezer")
    layout.create("frz", 1.0, 64, 10)
    proc = _sleeper()
    try:
        layout.join("frz", proc.pid)
        layout.freeze("frz")
        assert _wait_until(lambda: layout.is_frozen("frz"))
        layout.thaw("frz")
        assert _wait_until(lambda: not layout.is_frozen("frz"))
        assert _state(proc.pid) in "SR"
    finally:
        layout.kill("frz")
        proc.wait(timeout=10)
        assert _wait_until(lambda: layout.remove("frz"))


def test_v2_freeze_and_kill(v2: cg_mod.CgroupsV2) -> None:
    """Core cgroup2 files (freeze, kill) work even where the hierarchy holds no controllers."""
    v2.create("v2a", 1.0, 64, 10)
    proc = _sleeper()
    try:
        v2.join("v2a", proc.pid)
        assert v2.pids("v2a") == [proc.pid]
        v2.freeze("v2a")
        assert _wait_until(lambda: v2.is_frozen("v2a"))
        v2.thaw("v2a")
        assert _wait_until(lambda: not v2.is_frozen("v2a"))
        v2.kill("v2a")
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert _wait_until(lambda: v2.remove("v2a"))
    finally:
        proc.kill()
        proc.wait()


def test_v2_parse_own_paths_and_mounts() -> None:
    own = cg_mod._own_paths()
    assert all(path.startswith("/") for path in own.values())
    mounts = cg_mod._v1_mounts()
    for ctrl, mp in mounts.items():
        assert ctrl in cg_mod.V1_CONTROLLERS
        assert mp.is_dir()


def test_idle_cgroups(layout: cg_mod.Cgroups) -> None:
    """``idle`` at create, set and cleared, and through a spare's adoption (which writes the claimer's choice)."""
    assert layout.cpu_dir("x") is not None, "this host mounts the cpu controller: the idle priority must apply"
    layout.create("busy", 1.0, 64, 64)
    layout.create("spare", 1.0, 64, 64, idle=True)
    assert not layout.is_idle("busy")
    assert layout.is_idle("spare")
    layout.set_idle("busy", idle=True)
    assert layout.is_idle("busy")
    layout.set_idle("busy", idle=False)
    assert not layout.is_idle("busy")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        layout.join("spare", proc.pid)
        layout.adopt("spare", "claimed", proc.pid, 1.0, 64, 64)
        assert not layout.is_idle("claimed")
        layout.create("spare2", 1.0, 64, 64, idle=True)
        layout.join("spare2", proc.pid)
        layout.adopt("spare2", "refill", proc.pid, 1.0, 64, 64, idle=True)
        assert layout.is_idle("refill")
    finally:
        proc.kill()
        proc.wait()
