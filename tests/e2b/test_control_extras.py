"""The unmodified e2b SDK against a real daemon: update_network, Template.exists, volumes (refused clearly)."""

from __future__ import annotations

import asyncio
import secrets
import signal

import httpx
import pytest
from e2b.exceptions import InvalidArgumentException, SandboxException, SandboxNotFoundException

from e2b import AsyncSandbox, PtySize, Sandbox, Secret, Template, Volume
from tests.conftest import DaemonProc
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)


def _policy(e2b_env: E2BDaemon, sid: str) -> dict[str, object]:
    r = httpx.get(f"{e2b_env.url}/v1/sandboxes/{sid}/network", headers={"authorization": f"Bearer {e2b_env.key}"})
    r.raise_for_status()
    policy: dict[str, object] = r.json()
    policy.pop("port_token")
    return policy


def test_update_network_changes_the_egress_policy(sbx: Sandbox, e2b_env: E2BDaemon) -> None:
    sbx.update_network({"deny_out": ["8.8.8.8"]})
    assert _policy(e2b_env, sbx.sandbox_id)["deny_out"] == ["8.8.8.8/32"]
    sbx.update_network({"allow_out": ["1.1.1.1"], "allow_internet_access": False})
    after = _policy(e2b_env, sbx.sandbox_id)
    assert after["allow_out"] == ["1.1.1.1/32"] and after["deny_out"] == ["8.8.8.8/32"]  # absent keys stay
    assert after["allow_internet_access"] is False
    info = sbx.get_info()  # get_info reports the policy as E2B does
    assert info.network == {"allow_out": ["1.1.1.1/32"], "deny_out": ["8.8.8.8/32"]}
    assert info.allow_internet_access is False
    sbx.update_network({"deny_out": []})
    assert _policy(e2b_env, sbx.sandbox_id)["deny_out"] == []
    with pytest.raises(SandboxNotFoundException):
        Sandbox.update_network("no-such-sandbox", {"deny_out": ["8.8.8.8"]})  # type: ignore[call-overload]


def test_update_network_refuses_what_it_cannot_apply(sbx: Sandbox, e2b_env: E2BDaemon) -> None:
    before = _policy(e2b_env, sbx.sandbox_id)
    headers = {"X-API-KEY": e2b_env.key}
    with httpx.Client(base_url=e2b_env.url, headers=headers) as http:
        for body in ({"dnsServers": ["9.9.9.9"]}, {"denyOut": ["8.8.8.8"], "rules": {}}, {"denyOut": ["not a host!"]},
                     {"denyOut": "8.8.8.8"}, {"allow_internet_access": "no"}):  # fmt: skip
            r = http.put(f"/sandboxes/{sbx.sandbox_id}/network", json=body)
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()) == {"code", "message"} and r.json()["code"] == 400
    assert _policy(e2b_env, sbx.sandbox_id) == before  # nothing was half applied
    with pytest.raises((InvalidArgumentException, SandboxException)):
        sbx.update_network({"dns_servers": ["9.9.9.9"]})  # type: ignore[typeddict-unknown-key]


async def test_async_update_network(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=60)
    try:
        await sbx.update_network({"deny_out": ["8.8.4.4"]})
        assert _policy(e2b_env, sbx.sandbox_id)["deny_out"] == ["8.8.4.4/32"]
    finally:
        await sbx.kill()


def test_template_exists_and_volumes_are_refused(e2b_env: E2BDaemon) -> None:
    assert Template.exists("default") is True
    assert Template.exists("base") is True  # served by default until a base template exists
    assert Template.exists("no-such-template") is False
    assert Template.alias_exists("no-such-template") is False
    with pytest.raises(Exception, match="volumes are not supported"):
        Volume.create("vol")
    for path in ("/volumes", "/volumes/v1/file", "/secrets"):
        r = httpx.get(f"{e2b_env.url}{path}", headers={"X-API-KEY": e2b_env.key})
        assert r.status_code == 501 and set(r.json()) == {"code", "message"}, path
    with pytest.raises(Exception, match="secrets are not supported"):
        Secret.list().next_items()
    before = {s.sandbox_id for s in Sandbox.list().next_items()}
    with pytest.raises(SandboxException, match="volume mounts are not supported"):
        Sandbox.create("default", timeout=30, volume_mounts={"/mnt/v": "vol"})
    assert {s.sandbox_id for s in Sandbox.list().next_items()} == before


def test_the_rest_of_the_surface(e2b_env: E2BDaemon) -> None:
    """Calls the coverage table in docs/e2b.md marks served that other tests do not reach."""
    sbx = Sandbox.create("default", timeout=120, secure=False)
    try:
        # git through commands.run, as the SDK does it
        sbx.git.init("/tmp/repo")
        sbx.files.write("/tmp/repo/a.txt", "a")
        assert [f.name for f in sbx.git.status("/tmp/repo").file_status] == ["a.txt"]
        sbx.git.add("/tmp/repo", all=True)
        sbx.git.commit("/tmp/repo", "first", author_name="n", author_email="n@example.com")
        assert sbx.git.status("/tmp/repo").file_status == []
        # a background command and a second client attached without the output so far
        h = sbx.commands.run("echo early; sleep 1; echo late", background=True)
        again = sbx.commands.connect(h.pid, retain_output=False)
        assert again.wait().exit_code == 0
        # a pty and a second connection to it
        out: list[bytes] = []
        pty = sbx.pty.create(PtySize(rows=24, cols=80))
        attached = sbx.pty.connect(pty.pid)
        sbx.pty.send_stdin(pty.pid, b"echo mark-$((6*7)); exit\n")
        attached.wait(on_pty=out.append)
        assert b"mark-42" in b"".join(out)
        # pause modes: the freezer keeps everything; strict and beta_pause; connect with on_resume
        sbx.files.write("/tmp/kept", "k")
        snap = sbx.create_snapshot(mode="filesystem")
        assert sbx.pause(mode="filesystem") is True
        assert sbx.pause(strict=True) is False
        Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
        assert sbx.files.read("/tmp/kept") == "k"
        assert sbx.beta_pause() is True
        Sandbox.connect(sbx.sandbox_id)
        assert sbx.is_running()
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    finally:
        sbx.kill()


async def test_idempotency_key_makes_one_sandbox(e2b_env: E2BDaemon) -> None:
    key = "retry-" + secrets.token_hex(6)
    before = {s.sandbox_id for s in await AsyncSandbox.list().next_items()}
    made = await asyncio.gather(*(AsyncSandbox.create("default", timeout=60, idempotency_key=key) for _ in range(3)))
    try:
        assert len({s.sandbox_id for s in made}) == 1  # three concurrent tries, one sandbox
        again = Sandbox.create("default", timeout=60, idempotency_key=key)  # a later retry: the same one
        assert again.sandbox_id == made[0].sandbox_id and again.commands.run("echo ok").stdout == "ok\n"
        with pytest.raises(SandboxException, match="another request"):  # the key with another body: refused
            Sandbox.create("default", timeout=60, metadata={"x": "y"}, idempotency_key=key)
        after = {s.sandbox_id for s in await AsyncSandbox.list().next_items()}
        assert after - before == {made[0].sandbox_id}
        r = httpx.post(f"{e2b_env.url}/v2/sandboxes", json={"templateID": "default"},
                       headers={"X-API-KEY": e2b_env.key, "Idempotency-Key": "Not Allowed"})  # fmt: skip
        assert r.status_code == 400 and set(r.json()) == {"code", "message"}
    finally:
        await made[0].kill()


def test_an_idempotency_key_outlives_a_daemon_restart(restartable_daemon: DaemonProc) -> None:
    """A create answered before a restart is not made again by a retry after it (nor after a kill -9): the key is
    kept in the daemon's SQLite file before the create is answered; another body with the key is still refused."""
    d = restartable_daemon
    key = "restart-" + secrets.token_hex(6)
    first = Sandbox.create("default", timeout=300, idempotency_key=key)
    try:
        d.stop()
        d.start()
        again = Sandbox.create("default", timeout=300, idempotency_key=key)
        assert again.sandbox_id == first.sandbox_id
        assert again.commands.run("echo same").stdout == "same\n"
        d.stop(signal.SIGKILL)  # a crash: what was answered is kept as well
        d.start()
        assert Sandbox.create("default", timeout=300, idempotency_key=key).sandbox_id == first.sandbox_id
        with pytest.raises(SandboxException, match="another request"):
            Sandbox.create("default", timeout=300, metadata={"x": "y"}, idempotency_key=key)
        listed = httpx.get(f"{d.url}/v1/sandboxes", headers=d.headers, timeout=30).json()
        assert [s["sandbox_id"] for s in listed] == [first.sandbox_id]  # one sandbox, whatever the retries
    finally:
        Sandbox.kill(first.sandbox_id)
