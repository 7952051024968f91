"""The unmodified e2b SDK (sync and async) against a real daemon: listing and deleting snapshots."""

from __future__ import annotations

import secrets

import httpx
import pytest
from e2b.exceptions import SandboxException

from e2b import AsyncSandbox, Sandbox
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)


def test_list_and_delete_snapshots(e2b_env: E2BDaemon) -> None:
    sbx = Sandbox.create("default", timeout=120)
    other = Sandbox.create("default", timeout=120)
    tag = secrets.token_hex(4)
    try:
        snaps = [sbx.create_snapshot(name=f"s{i}-{tag}") for i in range(3)]
        theirs = other.create_snapshot()
        assert snaps[0].names == [f"s0-{tag}"] and theirs.names == []
        # the instance's list is its own snapshots, newest first; forks' internal snapshots never show
        sbx.fork(count=1, timeout=30)[0].kill()  # type: ignore[union-attr]
        listed = sbx.list_snapshots().next_items()
        assert [s.snapshot_id for s in listed] == [s.snapshot_id for s in reversed(snaps)]
        everything = {s.snapshot_id for s in Sandbox.list_snapshots().next_items()}
        assert {s.snapshot_id for s in snaps} | {theirs.snapshot_id} <= everything
        # paging with the X-Next-Token, and the filter by name or id
        pages = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id, limit=2)
        first = pages.next_items()
        assert pages.has_next
        second = pages.next_items()
        assert not pages.has_next
        assert [s.snapshot_id for s in first + second] == [s.snapshot_id for s in reversed(snaps)]
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=f"s1-{tag}").next_items()] == [snaps[1].snapshot_id]
        by_id = Sandbox.list_snapshots(name=theirs.snapshot_id).next_items()
        assert [s.snapshot_id for s in by_id] == [theirs.snapshot_id]

        # delete by id and by name; a second delete (or a template's name) is False, as for an unknown snapshot
        assert Sandbox.delete_snapshot(snaps[0].snapshot_id) is True
        assert Sandbox.delete_snapshot(f"s1-{tag}") is True
        assert Sandbox.delete_snapshot(snaps[0].snapshot_id) is False
        assert Sandbox.delete_snapshot("default") is False
        assert [s.snapshot_id for s in sbx.list_snapshots().next_items()] == [snaps[2].snapshot_id]
        with pytest.raises(SandboxException):  # a deleted snapshot is no template any more
            Sandbox.create(template=snaps[0].snapshot_id, timeout=30)
        restored = Sandbox.create(template=snaps[2].snapshot_id, timeout=30)  # the others are untouched
        restored.kill()
        assert Sandbox.delete_snapshot(theirs.snapshot_id) is True
    finally:
        sbx.kill()
        other.kill()


async def test_async_list_and_delete_snapshots(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=120)
    try:
        snap = await sbx.create_snapshot()
        listed = await sbx.list_snapshots().next_items()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        assert await AsyncSandbox.delete_snapshot(snap.snapshot_id) is True
        assert await AsyncSandbox.delete_snapshot(snap.snapshot_id) is False
        assert await AsyncSandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items() == []
    finally:
        await sbx.kill()


def test_snapshot_routes_refuse_bad_input_in_e2b_shape(e2b_env: E2BDaemon) -> None:
    headers = {"X-API-KEY": e2b_env.key}
    with httpx.Client(base_url=e2b_env.url, headers=headers) as http:
        for query in ("limit=0", "limit=abc", "limit=100000", "nextToken=garbage"):
            r = http.get(f"/snapshots?{query}")
            assert r.status_code == 400, (query, r.text)
            assert set(r.json()) == {"code", "message"} and r.json()["code"] == 400
        r = http.delete("/templates/no-such-snapshot")
        assert r.status_code == 404 and r.json()["code"] == 404 and "snapshot" in r.json()["message"]
        r = http.get("/templates/default")  # other template routes are E2B-shaped 404s, not FastAPI's detail
        assert r.status_code == 404 and set(r.json()) == {"code", "message"}
        assert http.get("/snapshots", headers={"X-API-KEY": "e2b_" + "0" * 40}).status_code == 401
        assert http.delete("/templates/x", headers={"X-API-KEY": "wrong"}).json()["code"] == 401
