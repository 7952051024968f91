"""Pause on timeout through branchbox's own API and SDK (sync and async), against a real daemon: on_timeout="pause"
keeps the sandbox paused at its end; a resume starts its timeout again; bad values are bad_request."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import branchbox.sdk as sdk
from tests.test_net_api import serve_in

pytestmark = pytest.mark.timeout(300)
WAIT_S = 90  # a bound on a loaded host, not a measurement


def test_timeout_pauses_and_resume_restarts_it(daemon: Any) -> None:
    with sdk.Sandbox.create(timeout=4, on_timeout="pause", base_url=daemon.url) as sbx:
        assert sbx.info.on_timeout == "pause"
        sbx.files.write("/root/kept.txt", "kept")
        deadline = time.monotonic() + WAIT_S
        while (info := sbx.get_info()).state != "paused":
            assert time.monotonic() < deadline, "the sandbox did not pause at its timeout"
            time.sleep(0.3)
        assert info.end_at is None  # no time to live while paused
        resumed = sbx.resume()
        assert resumed.state == "running" and resumed.end_at is not None  # its timeout runs again
        assert sbx.files.read("/root/kept.txt") == "kept"


async def test_async_default_destroys_and_bad_values_are_refused(daemon: Any) -> None:
    async with await sdk.AsyncSandbox.create(timeout=60, base_url=daemon.url) as sbx:
        assert sbx.info.on_timeout == "destroy"
    async with httpx.AsyncClient(base_url=daemon.url) as http:
        before = len((await http.get("/v1/sandboxes")).json())
        for value in ("kill", "", 1, None):
            r = await http.post("/v1/sandboxes", json={"timeout": 30, "on_timeout": value})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (value, r.text)
        assert len((await http.get("/v1/sandboxes")).json()) == before  # nothing was created


def _wait_paused(sbx: sdk.Sandbox) -> None:
    deadline = time.monotonic() + WAIT_S
    while sbx.get_info().state != "paused":
        assert time.monotonic() < deadline, "the sandbox did not pause at its timeout"
        time.sleep(0.3)


def test_auto_resume_wakes_a_paused_sandbox_for_the_next_call(daemon: Any) -> None:
    """With auto_resume, what needs the sandbox running wakes it (a command, a file read, a listing, traffic to its
    port through the daemon); without it, the same calls say to resume first; auto_resume without pause is
    refused."""
    with sdk.Sandbox.create(timeout=3, on_timeout="pause", auto_resume=True, base_url=daemon.url) as sbx:
        assert sbx.info.auto_resume is True
        sbx.files.write("/root/kept.txt", "kept")
        _wait_paused(sbx)
        assert sbx.commands.run("cat /root/kept.txt").stdout == "kept"  # woken by the command
        info = sbx.get_info()
        assert info.state == "running" and info.end_at is not None  # and its timeout runs again
        sbx.pause()
        assert sbx.files.read("/root/kept.txt") == "kept"  # a file read (a streamed download) wakes it too
        sbx.pause()
        again = sdk.Sandbox.connect(sbx.sandbox_id, base_url=daemon.url)  # not `with`: that would kill it
        assert again.files.list("/root") and again.get_info().state == "running"
        again.close()
        serve_in(sbx, 8000)
        sbx.pause()
        page = httpx.get(sbx.get_host(8000) + "woken", timeout=60)  # traffic to its port through the daemon
        assert page.status_code == 200 and page.json()["path"] == "/woken"
        assert sbx.get_info().state == "running"
    with sdk.Sandbox.create(timeout=300, on_timeout="pause", base_url=daemon.url) as plain:
        plain.pause()
        with pytest.raises(sdk.SandboxError, match="resume it first"):
            plain.commands.run("true")
        with pytest.raises(sdk.SandboxError, match="resume it first"):
            plain.files.read("/etc/hostname")
        assert plain.get_info().state == "paused"  # nothing woke it
    with pytest.raises(sdk.BadRequestError, match="auto_resume needs on_timeout='pause'"):
        sdk.Sandbox.create(timeout=30, auto_resume=True, base_url=daemon.url)
