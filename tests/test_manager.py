"""The core Manager end to end on the real container backend and the real default template."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from branchbox import errors
from branchbox.core.events import ManagerEvent
from branchbox.core.manager import Manager
from branchbox.models import SandboxState
from tests.conftest import make_settings
from tests.leaks import HostSnapshot

pytestmark = [pytest.mark.root, pytest.mark.template]


async def test_issue_example(manager: Manager) -> None:
    sbx = await manager.create(template="default", env={"A": "1"}, timeout=300, cpu=1, memory_mb=512)
    assert sbx.state is SandboxState.RUNNING
    assert sbx.source == "cold"
    assert {"boot", "agent_connect", "total"} <= set(sbx.timings) or "total" in sbx.timings
    r = await manager.exec(sbx.id, "python3 -c 'print(6*7)'")
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"42\n", b"")
    r = await manager.exec(sbx.id, "echo $A")
    assert r.stdout == b"1\n"
    await manager.write_file(sbx.id, "/work/a.txt", b"hi")
    assert await manager.read_file(sbx.id, "/work/a.txt") == b"hi"
    await manager.destroy(sbx.id)
    with pytest.raises(errors.SandboxNotFoundError):
        await manager.get(sbx.id)
    with pytest.raises(errors.SandboxNotFoundError):
        await manager.exec(sbx.id, "true")


async def test_list_filters_by_metadata(manager: Manager) -> None:
    a = await manager.create(metadata={"task": "t1"})
    b = await manager.create(metadata={"task": "t2"})
    assert [s.id for s in await manager.list(metadata={"task": "t1"})] == [a.id]
    assert {s.id for s in await manager.list(states={SandboxState.RUNNING})} == {a.id, b.id}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"template": "no-such-template"}, errors.TemplateNotFoundError),
        ({"cpu": 0}, errors.BadRequestError),
        ({"cpu": 1000}, errors.BadRequestError),
        ({"memory_mb": 1}, errors.BadRequestError),
        ({"memory_mb": 10**9}, errors.BadRequestError),
        ({"pids": 0}, errors.BadRequestError),
        ({"timeout": 0}, errors.BadRequestError),
        ({"timeout": -5}, errors.BadRequestError),
        ({"timeout": 10**9}, errors.LimitExceededError),
        ({"env": {"1BAD": "x"}}, errors.BadRequestError),
        ({"env": {"A": "x\0y"}}, errors.BadRequestError),
        ({"env": {f"K{i}": "v" * 1024 for i in range(400)}}, errors.PayloadTooLargeError),
        ({"metadata": {"k": "v" * 5000}}, errors.BadRequestError),
        ({"hostname": "Not A Hostname"}, errors.BadRequestError),
        ({"backend": "nope"}, errors.NotSupportedError),
    ],
)
async def test_bad_create_input_changes_nothing(
    manager: Manager, data_dir: Path, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    before = HostSnapshot.take(manager.settings.cgroup_parent)
    with pytest.raises(error) as info:
        await manager.create(**kwargs)
    assert isinstance(info.value, errors.BranchboxError)
    assert info.value.code  # a stable code for the API
    assert await manager.list() == []
    assert list((data_dir / "sandboxes").iterdir()) == []
    HostSnapshot.take(manager.settings.cgroup_parent).assert_same(before)


async def test_paths_cannot_escape(manager: Manager) -> None:
    sbx = await manager.create()
    for bad in ("/work/../../etc/passwd-x", "../../../../x", "/a\0b"):
        with pytest.raises(errors.InvalidPathError):
            await manager.write_file(sbx.id, bad, b"x")
    # a symlink pointing "out" resolves inside the sandbox: the host's file is never read
    host_secret = Path("/etc/branchbox-host-secret-test")
    host_secret.write_text("host only")
    try:
        r = await manager.exec(sbx.id, f"ln -s ../../../../..{host_secret} /work/esc")
        assert r.exit_code == 0
        with pytest.raises(errors.FileNotFoundInSandboxError):
            await manager.read_file(sbx.id, "/work/esc")
    finally:
        host_secret.unlink()


async def test_invalid_utf8_output_is_bytes(manager: Manager) -> None:
    sbx = await manager.create()
    r = await manager.exec(sbx.id, ["python3", "-c", "import sys; sys.stdout.buffer.write(b'\\xff\\xfe ok')"])
    assert r.stdout == b"\xff\xfe ok"


async def test_ttl_reaper_destroys_expired_sandbox(manager: Manager) -> None:
    gone = asyncio.Event()
    sbx = await manager.create(timeout=1)

    def on_event(ev: ManagerEvent) -> None:
        if ev.kind == "state" and sbx.id not in set(manager._live):
            gone.set()

    manager.subscribe(on_event)
    await asyncio.wait_for(gone.wait(), timeout=30)
    with pytest.raises(errors.SandboxNotFoundError):
        await manager.get(sbx.id)


async def test_events_reach_subscribers_after_the_call(manager: Manager) -> None:
    """A create returns before its subscribers hear of it (the daemon answers before it counts metrics); they get
    its events in order once the loop's turn is done, each subscriber only the kinds it asked for."""
    seen: list[ManagerEvent] = []
    timed: list[ManagerEvent] = []
    manager.subscribe(seen.append)
    manager.subscribe(timed.append, kinds={"create", "exec"})
    sbx = await manager.create()
    assert seen == []
    await asyncio.sleep(0)
    assert [(ev.kind, ev.sandbox_id) for ev in seen] == [("create", sbx.id), ("state", None)]
    assert seen[0].source == "cold" and seen[0].timings["total"] > 0
    assert seen[1].counts["running"] == 1
    await manager.exec(sbx.id, "true")
    await manager.destroy(sbx.id)
    await asyncio.sleep(0)
    assert [ev.kind for ev in seen[2:]] == ["exec", "state", "destroy"]
    assert seen[3].counts["running"] == 0
    assert [ev.kind for ev in timed] == ["create", "exec"]


async def test_set_timeout_extends(manager: Manager) -> None:
    sbx = await manager.create(timeout=5)
    info = await manager.set_timeout(sbx.id, 600)
    assert info.expires_at is not None and info.expires_at > (sbx.expires_at or 0) + 500


async def test_pause_resume(manager: Manager) -> None:
    sbx = await manager.create()
    await manager.pause(sbx.id)
    with pytest.raises(errors.InvalidStateError):
        await manager.exec(sbx.id, "true")
    await manager.resume(sbx.id)
    assert (await manager.exec(sbx.id, "echo back")).stdout == b"back\n"


async def test_restart_reattaches_running_sandboxes(default_template: object, data_dir: Path) -> None:
    settings = make_settings(data_dir, keep_sandboxes_on_shutdown=True)
    async with Manager.open(settings) as m1:
        sbx = await m1.create(timeout=600)
        await m1.write_file(sbx.id, "/work/keep.txt", b"still here")
        bg = await m1.spawn(sbx.id, "sleep 600", tag="bg")
        bg_pid = bg.pid
        await bg.detach()
    async with Manager.open(settings) as m2:
        info = await m2.get(sbx.id)
        assert info.state is SandboxState.RUNNING
        assert await m2.read_file(sbx.id, "/work/keep.txt") == b"still here"
        assert bg_pid in {p.pid for p in await m2.list_processes(sbx.id) if p.running}
        await m2.destroy(sbx.id)


async def test_restart_marks_dead_sandboxes(default_template: object, data_dir: Path) -> None:
    settings = make_settings(data_dir, keep_sandboxes_on_shutdown=True)
    async with Manager.open(settings) as m1:
        sbx = await m1.create()
        pid = m1._live[sbx.id].handle.pid
    os.kill(pid, signal.SIGKILL)
    async with Manager.open(settings) as m2:
        info = await m2.get(sbx.id)
        assert info.state is SandboxState.ERROR
        assert info.error
        await m2.destroy(sbx.id)
        with pytest.raises(errors.SandboxNotFoundError):
            await m2.get(sbx.id)
        assert list((data_dir / "sandboxes").iterdir()) == []


async def test_sandbox_killed_from_outside_is_detected(manager: Manager) -> None:
    sbx = await manager.create()
    died = asyncio.Event()
    manager.subscribe(lambda ev: died.set() if ev.kind == "state" and ev.counts.get("error") else None)
    os.kill(manager._live[sbx.id].handle.pid, signal.SIGKILL)
    await asyncio.wait_for(died.wait(), timeout=30)
    assert (await manager.get(sbx.id)).state is SandboxState.ERROR
    with pytest.raises(errors.InvalidStateError):
        await manager.exec(sbx.id, "true")
    # once it is no longer live, its kept record still counts as an error (the /metrics gauge), as list shows it
    while sbx.id in manager._live:
        await asyncio.sleep(0.01)
    assert [i.state for i in await manager.list() if i.id == sbx.id] == [SandboxState.ERROR]
    counts = manager.state_counts()
    assert (counts["error"], counts["running"]) == (1, 0)
    await manager.destroy(sbx.id)
    assert manager.state_counts()["error"] == 0


async def test_localhost_and_the_sandboxs_own_name_resolve(manager: Manager) -> None:
    """As in a Docker container: /etc/hosts names localhost and the sandbox, /etc/hostname is its name (the
    template has no /etc/hosts and the build host's /etc/hostname)."""
    sbx = await manager.create()
    py = "import socket; print(socket.gethostbyname('localhost'), socket.gethostbyname(socket.gethostname()))"
    r = await manager.exec(sbx.id, ["python3", "-c", py])
    assert (r.exit_code, r.stdout) == (0, b"127.0.0.1 127.0.1.1\n"), r.stderr
    assert (await manager.exec(sbx.id, ["cat", "/etc/hostname"])).stdout.decode() == sbx.hostname + "\n"
    await manager.destroy(sbx.id)


async def test_twenty_sandboxes_at_once(manager: Manager) -> None:
    sbxs = await asyncio.gather(*(manager.create(memory_mb=128) for _ in range(20)))
    results = await asyncio.gather(*(manager.exec(s.id, "hostname") for s in sbxs))
    assert sorted(r.stdout.decode().strip() for r in results) == sorted(s.hostname for s in sbxs)
    await asyncio.gather(*(manager.destroy(s.id) for s in sbxs))


@pytest.mark.slow
async def test_create_destroy_200_times_leaves_nothing(manager: Manager, data_dir: Path) -> None:
    n = int(os.environ.get("BRANCHBOX_CYCLES", "200"))
    warm = await manager.create()  # first use starts helper processes; exclude them from the count
    await manager.destroy(warm.id)
    before = HostSnapshot.take(manager.settings.cgroup_parent)
    for _ in range(n):
        sbx = await manager.create(memory_mb=128)
        assert (await manager.exec(sbx.id, "true")).exit_code == 0
        await manager.destroy(sbx.id)
    HostSnapshot.take(manager.settings.cgroup_parent).assert_same(before)
    assert list((data_dir / "sandboxes").iterdir()) == []
