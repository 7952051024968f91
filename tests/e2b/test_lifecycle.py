"""The unmodified e2b SDK (sync and async) against a real daemon: sandbox lifecycle, listing, errors."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from e2b.exceptions import AuthenticationException, NotFoundException, SandboxException, SandboxNotRunningException

from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from tests.conftest import DaemonProc
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)


def test_create_info_timeout_kill(e2b_env: E2BDaemon) -> None:
    tag = secrets.token_hex(4)
    sbx = Sandbox.create("default", timeout=120, metadata={"t": tag}, envs={"GREETING": "hello"})
    try:
        assert sbx.is_running()
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata == {"t": tag}
        assert info.state == SandboxState.RUNNING
        assert 110 < (info.end_at - info.started_at).total_seconds() <= 121
        # the sandbox's envs reach its commands
        assert sbx.commands.run("echo $GREETING").stdout == "hello\n"
        sbx.set_timeout(600)
        longer = sbx.get_info()
        assert 590 < (longer.end_at - longer.started_at).total_seconds() <= 601 + 5
        # connect never shortens the timeout
        again = Sandbox.connect(sbx.sandbox_id, timeout=10)
        assert again.get_info().end_at == longer.end_at
        assert again.commands.run("echo same").stdout == "same\n"
        # the class-level calls take an id
        assert Sandbox.get_info(sbx.sandbox_id).sandbox_id == sbx.sandbox_id
    finally:
        assert sbx.kill() is True
    assert not sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_list_filters_paging_and_pause(e2b_env: E2BDaemon) -> None:
    tag = secrets.token_hex(4)
    made = [Sandbox.create("default", timeout=120, metadata={"t": tag, "n": str(i)}) for i in range(3)]
    try:
        mine = SandboxQuery(metadata={"t": tag})
        listed = Sandbox.list(query=mine).next_items()
        # newest first
        assert [s.sandbox_id for s in listed] == [s.sandbox_id for s in reversed(made)]
        assert [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"t": tag, "n": "1"})).next_items()] == [
            made[1].sandbox_id
        ]
        pages = Sandbox.list(query=mine, limit=2)
        first = pages.next_items()
        assert len(first) == 2 and pages.has_next
        second = pages.next_items()
        assert not pages.has_next
        assert [s.sandbox_id for s in first + second] == [s.sandbox_id for s in reversed(made)]

        made[0].pause()
        assert Sandbox.get_info(made[0].sandbox_id).state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(metadata={"t": tag}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [made[0].sandbox_id]
        running = Sandbox.list(query=SandboxQuery(metadata={"t": tag}, state=[SandboxState.RUNNING])).next_items()
        assert {s.sandbox_id for s in running} == {made[1].sandbox_id, made[2].sandbox_id}
        assert not made[0].is_running()  # envd of a paused sandbox does not answer
        with pytest.raises(SandboxNotRunningException):
            made[0].commands.run("echo frozen")
        with pytest.raises(SandboxNotRunningException):
            made[0].files.read("/etc/hostname")
        assert made[0].pause() is False  # already paused
        resumed = Sandbox.connect(made[0].sandbox_id)  # connect resumes a paused sandbox
        assert resumed.get_info().state == SandboxState.RUNNING
        assert resumed.commands.run("echo back").stdout == "back\n"
    finally:
        for s in made:
            s.kill()


def test_bad_api_key_and_bad_access_token(e2b_env: E2BDaemon) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create("default", api_key="bb_wrong")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="bb_wrong").next_items()
    sbx = Sandbox.create("default", timeout=60)
    try:
        # another sandbox's token (or none) opens nothing: envd answers 401
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        for token in (None, "x" * 43):
            h = headers if token is None else {**headers, "X-Access-Token": token}
            r = httpx.get(f"{e2b_env.url}/files", params={"path": "/etc/hostname"}, headers=h)
            assert r.status_code == 401, r.text
            r = httpx.post(f"{e2b_env.url}/process.Process/List", json={}, headers=h)
            assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
        # a real token of another sandbox opens nothing here either
        other = Sandbox.create("default", timeout=60)
        try:
            h = {**headers, "X-Access-Token": other._envd_access_token}
            assert httpx.get(f"{e2b_env.url}/files", params={"path": "/etc/hostname"}, headers=h).status_code == 401
            # and a sandbox id that does not exist is refused the same way, so ids cannot be probed
            h = {**h, "E2b-Sandbox-Id": "0" * 20}
            assert httpx.get(f"{e2b_env.url}/files", params={"path": "/etc/hostname"}, headers=h).status_code == 401
        finally:
            other.kill()
        # the right token works with the same request
        token = sbx._envd_access_token
        r = httpx.get(
            f"{e2b_env.url}/files", params={"path": "/etc/hostname"}, headers={**headers, "X-Access-Token": token}
        )
        assert r.status_code == 200
        # branchbox's own /health (no sandbox header) is untouched
        assert httpx.get(f"{e2b_env.url}/health").json() == {"status": "ok"}
    finally:
        sbx.kill()


def test_control_plane_errors_are_e2b_json(e2b_env: E2BDaemon) -> None:
    h = {"X-API-KEY": e2b_env.key}
    r = httpx.get(f"{e2b_env.url}/sandboxes/nope", headers=h)
    assert r.status_code == 404 and set(r.json()) == {"code", "message"} and r.json()["code"] == 404
    r = httpx.post(f"{e2b_env.url}/v2/sandboxes", headers=h, content=b"[1]")
    assert r.status_code == 400 and r.json()["code"] == 400
    r = httpx.post(f"{e2b_env.url}/v2/sandboxes", headers=h, json={"templateID": "no-such-template"})
    assert r.status_code == 404 and "no-such-template" in r.json()["message"]
    r = httpx.get(f"{e2b_env.url}/v2/sandboxes", headers=h, params={"state": "exploded"})
    assert r.status_code == 400
    with pytest.raises(SandboxException):
        Sandbox.create(template="no-such-template")


async def test_async_lifecycle(e2b_env: E2BDaemon) -> None:
    tag = secrets.token_hex(4)
    sbx = await AsyncSandbox.create("default", timeout=120, metadata={"t": tag})
    try:
        assert await sbx.is_running()
        assert (await sbx.get_info()).metadata == {"t": tag}
        await sbx.set_timeout(300)
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"t": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        await sbx.pause()
        assert not await sbx.is_running()
        again = await AsyncSandbox.connect(sbx.sandbox_id)
        assert await again.is_running()
        assert (await again.commands.run("echo async")).stdout == "async\n"
    finally:
        assert await sbx.kill() is True
    assert not await sbx.is_running()
    with pytest.raises(NotFoundException):
        await AsyncSandbox.connect(sbx.sandbox_id)
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create("default", api_key="bb_wrong")


def test_snapshot_and_fork(e2b_env: E2BDaemon) -> None:
    sbx = Sandbox.create("default", timeout=120)
    made: list[Sandbox] = []
    try:
        sbx.files.write("/root/state.txt", "v1")
        snap = sbx.create_snapshot()
        sbx.files.write("/root/state.txt", "v2")
        # a snapshot id is a template for Sandbox.create, as on E2B
        restored = Sandbox.create(template=snap.snapshot_id, timeout=60)
        made.append(restored)
        assert restored.files.read("/root/state.txt") == "v1"
        forks = sbx.fork(count=2, timeout=60)
        assert all(isinstance(f, Sandbox) for f in forks)
        made += [f for f in forks if isinstance(f, Sandbox)]
        assert {f.files.read("/root/state.txt") for f in made[1:]} == {"v2"}
        assert len({sbx.sandbox_id, *(f.sandbox_id for f in made)}) == 4
        assert sbx.commands.run("cat /root/state.txt").stdout == "v2"  # the parent goes on
    finally:
        for s in [sbx, *made]:
            s.kill()


def test_paused_sandbox_survives_daemon_restart(restartable_daemon: DaemonProc) -> None:
    d = restartable_daemon
    sbx = Sandbox.create("default", timeout=300)
    sbx.files.write("/root/kept.txt", "kept")
    sbx.pause()
    d.stop()
    d.start()
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    again = Sandbox.connect(sbx.sandbox_id)  # the token the SDK holds still opens it (derived, not stored)
    assert again.files.read("/root/kept.txt") == "kept"
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    again.kill()


def test_timeout_expiry_kills(e2b_env: E2BDaemon) -> None:
    sbx = Sandbox.create("default", timeout=2)
    deadline = time.monotonic() + 60
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sbx.is_running()
