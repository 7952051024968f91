"""The unmodified e2b SDK (sync and async) against a real daemon: ``lifecycle`` (pause instead of kill on timeout,
auto-resume on traffic), across a daemon restart, and the bad input of its create fields."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from e2b.exceptions import SandboxNotRunningException

from e2b import AsyncSandbox, Sandbox, SandboxState
from tests.conftest import DaemonProc
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)
WAIT_S = 90  # how long a test waits for a timeout to fire on a loaded host (a bound, not a measurement)


def wait_paused(sandbox_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while Sandbox.get_info(sandbox_id).state != SandboxState.PAUSED:
        assert time.monotonic() < deadline, f"{sandbox_id} did not pause at its timeout"
        time.sleep(0.3)


async def await_paused(sandbox_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while (await AsyncSandbox.get_info(sandbox_id)).state != SandboxState.PAUSED:
        assert time.monotonic() < deadline, f"{sandbox_id} did not pause at its timeout"
        await asyncio.sleep(0.3)


def left_s(end_at: datetime) -> float:
    return (end_at - datetime.now(UTC)).total_seconds()


def test_timeout_pauses_and_connect_resumes(e2b_env: E2BDaemon) -> None:
    sbx = Sandbox.create("default", timeout=6, lifecycle={"on_timeout": "pause"})
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        sbx.files.write("/root/kept.txt", "kept")
        sleeper = sbx.commands.run("sleep 600", background=True)
        wait_paused(sbx.sandbox_id)  # paused, not killed: its files and processes are kept
        info = sbx.get_info()
        assert info.end_at.year == 9999  # no time to live while paused
        # without auto_resume, traffic does not wake it: envd answers as for any paused sandbox
        assert not sbx.is_running()
        with pytest.raises(SandboxNotRunningException):
            sbx.commands.run("true")
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        again = Sandbox.connect(sbx.sandbox_id)  # connect resumes it
        assert again.get_info().state == SandboxState.RUNNING
        assert again.files.read("/root/kept.txt") == "kept"
        assert sleeper.pid in [p.pid for p in again.commands.list()]  # the freezer kept its processes
        # and its timeout runs again from the resume, so it pauses again rather than living on
        wait_paused(sbx.sandbox_id)
        again.set_timeout(60)  # set_timeout on a paused sandbox, then a resume: it runs on
        again = Sandbox.connect(sbx.sandbox_id, timeout=60)
        assert again.commands.run("cat /root/kept.txt").stdout == "kept"
    finally:
        sbx.kill()
    assert Sandbox.kill(sbx.sandbox_id) is False


async def test_auto_resume_on_traffic(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=8, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        assert (await sbx.get_info()).lifecycle == {"on_timeout": "pause", "auto_resume": True}
        await sbx.files.write("/root/note.txt", "before")
        await await_paused(sbx.sandbox_id)
        # any envd request wakes it: a command, with no connect first
        assert (await sbx.commands.run("cat /root/note.txt")).stdout == "before"
        info = await sbx.get_info()
        assert info.state == SandboxState.RUNNING
        assert 0 < left_s(info.end_at) <= 8.5  # a fresh time to live: the one it was created with
        await await_paused(sbx.sandbox_id)
        assert await sbx.files.read("/root/note.txt") == "before"  # a file call wakes it too
        await await_paused(sbx.sandbox_id)
        assert await sbx.is_running()  # and the health check: envd answers once it is awake
        await sbx.set_timeout(60)
        assert (await sbx.get_info()).state == SandboxState.RUNNING
    finally:
        await sbx.kill()


def test_signed_url_wakes_only_auto_resume_sandboxes(e2b_env: E2BDaemon) -> None:
    woken = Sandbox.create("default", timeout=6, lifecycle={"on_timeout": "pause", "auto_resume": True})
    asleep = Sandbox.create("default", timeout=6, lifecycle={"on_timeout": "pause"})
    try:
        for s in (woken, asleep):
            s.files.write("/tmp/s.txt", s.sandbox_id)
        urls = {s.sandbox_id: s.download_url("/tmp/s.txt", use_signature_expiration=600) for s in (woken, asleep)}
        wait_paused(woken.sandbox_id)
        wait_paused(asleep.sandbox_id)
        assert httpx.get(urls[woken.sandbox_id]).text == woken.sandbox_id
        assert Sandbox.get_info(woken.sandbox_id).state == SandboxState.RUNNING
        assert httpx.get(urls[asleep.sandbox_id]).status_code == 401  # it stays paused
        assert Sandbox.get_info(asleep.sandbox_id).state == SandboxState.PAUSED
    finally:
        woken.kill()
        asleep.kill()


def test_default_lifecycle_kills_and_bad_fields_are_refused(e2b_env: E2BDaemon) -> None:
    sbx = Sandbox.create("default", timeout=120)
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "kill", "auto_resume": False}
    finally:
        sbx.kill()
    before = {s.sandbox_id for s in Sandbox.list().next_items()}
    bad: list[dict[str, Any]] = [
        {"autoResume": {"enabled": True}},  # auto-resume of a sandbox its timeout kills
        {"autoPause": "yes"},
        {"autoPause": True, "autoPauseMemory": 1},
        {"autoPause": True, "autoResume": True},
        {"autoPause": True, "autoResume": {"enabled": "on"}},
    ]
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.key}) as http:
        for fields in bad:
            r = http.post("/v2/sandboxes", json={"templateID": "default", "timeout": 30, **fields})
            assert r.status_code == 400, (fields, r.text)
            assert set(r.json()) == {"code", "message"} and r.json()["code"] == 400
    assert {s.sandbox_id for s in Sandbox.list().next_items()} == before  # nothing was created


def test_timeout_that_passed_while_the_daemon_was_down_pauses(restartable_daemon: DaemonProc) -> None:
    d = restartable_daemon
    sbx = Sandbox.create("default", timeout=20, lifecycle={"on_timeout": "pause", "auto_resume": True})
    end_at = sbx.get_info().end_at
    sbx.files.write("/root/kept.txt", "kept")
    d.stop()
    time.sleep(max(0.0, left_s(end_at) + 1))  # its timeout passes while no daemon runs
    d.start()
    wait_paused(sbx.sandbox_id)  # the restarted daemon pauses it (it does not destroy it)
    assert sbx.files.read("/root/kept.txt") == "kept"  # and traffic wakes it
    assert Sandbox.get_info(sbx.sandbox_id).lifecycle == {"on_timeout": "pause", "auto_resume": True}
    sbx.kill()
