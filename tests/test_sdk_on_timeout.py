"""Pause on timeout through branchbox's own API and SDK (sync and async), against a real daemon: on_timeout="pause"
keeps the sandbox paused at its end; a resume starts its timeout again; bad values are bad_request."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import branchbox.sdk as sdk

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
