"""Faults, tested (issue 21.5): ``kill -9`` of the daemon while creates, forks and snapshots are in flight.

After the restart every sandbox and snapshot that was reported done is there and works, nothing is left half-made
(no sandbox in ``creating``, no hidden fork snapshot), and once everything is destroyed nothing is left on the host:
processes, cgroups, veths, the nftables table, mounts, sandbox and layer dirs.

``BRANCHBOX_TEST_CRASH_OPS`` sets how many operations are in flight (default 36: bounded suite time)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DaemonProc
from tests.leaks import _mounts
from tests.net_env import host_network_state

pytestmark = [pytest.mark.root, pytest.mark.template, pytest.mark.reliability]

OPS = int(os.environ.get("BRANCHBOX_TEST_CRASH_OPS", "36"))
KILL_AFTER = max(4, OPS // 4)  # the daemon is killed once this many operations were reported done


class Ops:
    """Operations sent at once; what each one reported before the daemon died."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.done = 0
        self.enough = threading.Event()
        self.sandboxes: dict[str, str] = {}  # id -> what made it ("create", "fork")
        self.snapshots: list[str] = []
        self.failed: list[str] = []

    def _post(self, path: str, body: dict[str, Any]) -> Any | None:
        try:
            r = httpx.post(self.url + path, json=body, timeout=120)
        except httpx.TransportError as exc:  # the daemon died under it: nothing was reported
            with self.lock:
                self.failed.append(f"{path}: {exc!r}")
            return None
        assert r.status_code in (200, 201), r.text
        return r.json()

    def _reported(self) -> None:
        with self.lock:
            self.done += 1
            if self.done >= KILL_AFTER:
                self.enough.set()

    def create(self, n: int) -> None:
        body = self._post("/v1/sandboxes", {"metadata": {"n": str(n)}})
        if body is not None:
            with self.lock:
                self.sandboxes[body["sandbox_id"]] = "create"
            self._reported()

    def fork(self, parent: str) -> None:
        body = self._post(f"/v1/sandboxes/{parent}/fork", {"count": 2})
        if body is not None:
            kids = [r["sandbox"]["sandbox_id"] for r in body["results"] if r.get("sandbox")]
            with self.lock:
                self.sandboxes.update(dict.fromkeys(kids, "fork"))
            self._reported()

    def snapshot(self, parent: str, n: int) -> None:
        body = self._post(f"/v1/sandboxes/{parent}/snapshots", {"name": f"crash-{n}"})
        if body is not None:
            with self.lock:
                self.snapshots.append(body["snapshot_id"])
            self._reported()


def _run(d: DaemonProc, cmd: str, sid: str) -> str:
    r = httpx.post(f"{d.url}/v1/sandboxes/{sid}/commands", json={"cmd": cmd}, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["stdout"])


def _eventually_empty(path: Path, what: str) -> None:
    for _ in range(300):  # background removals (layer GC, netns) end on their own; bounded wait
        if not path.exists() or not any(path.iterdir()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} left: {sorted(p.name for p in path.iterdir())[:5]}")


def test_kill9_during_concurrent_creates_forks_and_snapshots(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(keep=True, start=False)
    mounts_before = _mounts()
    d.start()
    parent = httpx.post(d.url + "/v1/sandboxes", json={}, timeout=60).json()["sandbox_id"]
    _run(d, "echo from-parent > /work/mark", parent)

    ops = Ops(d.url)
    with ThreadPoolExecutor(OPS) as pool:
        for n in range(OPS):
            kind = n % 3
            if kind == 0:
                pool.submit(ops.create, n)
            elif kind == 1:
                pool.submit(ops.fork, parent)
            else:
                pool.submit(ops.snapshot, parent, n)
        ops.enough.wait(300)
        d.stop(signal.SIGKILL)
    assert ops.enough.is_set(), f"only {ops.done} operations ended before the guard: {d.log()}"

    d.start()
    listed = {s["sandbox_id"]: s for s in httpx.get(d.url + "/v1/sandboxes", timeout=60).json()}
    assert set(ops.sandboxes) <= set(listed), "a sandbox reported created is gone after the crash"
    assert parent in listed
    bad = {
        sid: (s["state"], s.get("error"), ops.sandboxes.get(sid))
        for sid, s in listed.items()
        if s["state"] != "running"
    }
    assert not bad, f"half-made sandboxes were left: {bad}"
    for sid, how in ops.sandboxes.items():
        expect = "from-parent\n" if how == "fork" else ""
        assert _run(d, "cat /work/mark 2>/dev/null; true", sid) == expect, sid
    snaps = {s["snapshot_id"] for s in httpx.get(d.url + "/v1/snapshots", timeout=60).json()}
    assert set(ops.snapshots) <= snaps, "a snapshot reported done is gone after the crash"
    for snap in ops.snapshots[:3]:  # restoring them all would be as many more creates; three tell the story
        r = httpx.post(d.url + "/v1/sandboxes", json={"snapshot": snap}, timeout=120)
        assert r.status_code == 201, r.text
        assert _run(d, "cat /work/mark", r.json()["sandbox_id"]) == "from-parent\n"

    # everything goes once destroyed: no process, cgroup, veth, table, mount, sandbox or layer dir is left
    d.destroy_all()
    for snap in snaps:
        assert httpx.delete(f"{d.url}/v1/snapshots/{snap}", timeout=60).status_code == 204
    _eventually_empty(d.data_dir / "sandboxes", "sandbox dirs")
    _eventually_empty(d.data_dir / "layers", "layer dirs")
    assert d.stop() == 0
    assert d.leftovers() == []
    assert d.network is not None
    net = host_network_state(d.network)
    assert not net["ifaces"] and not net["tables"], net
    assert _mounts() <= mounts_before


def _freeze_behind_the_daemons_back(d: DaemonProc, sid: str) -> None:
    """Freeze a sandbox's cgroup as a snapshot does (what the daemon leaves when it dies mid-snapshot)."""
    v1 = Path(f"/sys/fs/cgroup/freezer/{d.cgroup_parent}/{sid}/freezer.state")
    if v1.exists():
        v1.write_text("FROZEN")
    else:
        v2 = next(Path("/sys/fs/cgroup").glob(f"**/{d.cgroup_parent}/{sid}/cgroup.freeze"))
        v2.write_text("1")


def test_kill9_with_a_sandbox_frozen_mid_snapshot_and_one_paused(daemon_factory: Any) -> None:
    """A restart found frozen agents silent: a sandbox frozen for a snapshot when the daemon died, and every paused
    one, timed out on re-attach and were destroyed ("could not re-attach its agent")."""
    d: DaemonProc = daemon_factory(keep=True)
    frozen, paused = (httpx.post(d.url + "/v1/sandboxes", json={}, timeout=60).json()["sandbox_id"] for _ in "ab")
    for sid in (frozen, paused):
        _run(d, f"echo {sid} > /work/me", sid)
    assert httpx.post(f"{d.url}/v1/sandboxes/{paused}/pause", timeout=60).status_code == 200
    _freeze_behind_the_daemons_back(d, frozen)
    d.stop(signal.SIGKILL)
    d.start()
    states = {s["sandbox_id"]: s["state"] for s in httpx.get(d.url + "/v1/sandboxes", timeout=60).json()}
    assert states == {frozen: "running", paused: "paused"}, d.log()
    assert _run(d, "cat /work/me", frozen) == f"{frozen}\n"
    assert httpx.post(f"{d.url}/v1/sandboxes/{paused}/resume", timeout=60).status_code == 200
    assert _run(d, "cat /work/me", paused) == f"{paused}\n"
