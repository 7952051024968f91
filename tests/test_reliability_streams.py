"""Faults, tested (issue 21.5): a client that stops reading a stream (a file download, a streamed command's
output) or goes away mid-upload. The daemon holds a bounded amount meanwhile and frees everything once the client
is gone: its open agent calls, its file descriptors and (within a stated slack) its memory, all read from the
daemon's own /metrics (``branchbox_agent_open_calls``, ``process_open_fds``, ``process_resident_memory_bytes``)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from branchbox.sdk import Sandbox
from tests.conftest import DaemonProc

pytestmark = [pytest.mark.root, pytest.mark.template, pytest.mark.reliability]

STALL_S = 3.0  # how long a client sits on a stream without reading
RSS_SLACK = 64 << 20  # what the daemon may hold for one stalled stream (the agent protocol's window, buffers)
FD_SLACK = 2  # fds may differ by a couple (a keep-alive connection of the scraping client)


def scrape(d: DaemonProc) -> dict[str, float]:
    text = httpx.get(d.url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def settled(d: DaemonProc, base: dict[str, float]) -> dict[str, float]:
    """The daemon's figures once no agent call is open and its fds are back near ``base`` (bounded wait: the
    daemon notices a gone client when its next write fails or its next read ends)."""
    now = scrape(d)
    for _ in range(100):
        if now["branchbox_agent_open_calls"] == 0 and now["process_open_fds"] <= base["process_open_fds"] + FD_SLACK:
            break
        time.sleep(0.1)
        now = scrape(d)
    return now


def assert_freed(d: DaemonProc, base: dict[str, float], what: str) -> None:
    now = settled(d, base)
    assert now["branchbox_agent_open_calls"] == 0, f"{what}: agent calls left open"
    assert now["process_open_fds"] <= base["process_open_fds"] + FD_SLACK, f"{what}: fds {base} -> {now}"
    grown = now["process_resident_memory_bytes"] - base["process_resident_memory_bytes"]
    assert grown < RSS_SLACK, f"{what}: the daemon kept {grown / 2**20:.0f} MiB"


def peak_rss_while_stalled(d: DaemonProc) -> float:
    peak = 0.0
    deadline = time.monotonic() + STALL_S
    while time.monotonic() < deadline:
        peak = max(peak, scrape(d)["process_resident_memory_bytes"])
        time.sleep(0.25)
    return peak


@pytest.fixture
def sandbox(daemon: DaemonProc) -> Any:
    with Sandbox.create(base_url=daemon.url) as sbx:
        sbx.commands.run("truncate -s 2G /work/huge")  # sparse: 2 GiB to read, no disk used
        sbx.files.read("/etc/hostname")  # the daemon's first download paths are loaded before the baseline
        yield sbx


def test_a_stalled_then_abandoned_download_is_freed(daemon: DaemonProc, sandbox: Sandbox) -> None:
    base = settled(daemon, scrape(daemon))
    url = f"{daemon.url}/v1/sandboxes/{sandbox.sandbox_id}/files"
    with httpx.Client(timeout=60) as client, client.stream("GET", url, params={"path": "/work/huge"}) as r:
        assert r.status_code == 200
        first = next(r.iter_raw())
        assert first
        peak = peak_rss_while_stalled(daemon)
    assert peak - base["process_resident_memory_bytes"] < RSS_SLACK, "a stalled download is buffered in the daemon"
    assert_freed(daemon, base, "download")
    assert sandbox.commands.run("echo ok").stdout.strip() == "ok"


def test_a_stalled_then_abandoned_command_stream_is_freed(daemon: DaemonProc, sandbox: Sandbox) -> None:
    base = settled(daemon, scrape(daemon))
    ws_url = daemon.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox.sandbox_id}/commands/stream"
    with connect(ws_url, max_size=None) as ws:
        ws.send(json.dumps({"cmd": "yes branchbox-output-that-nobody-reads", "kill_on_disconnect": True}))
        assert json.loads(ws.recv(timeout=30))["type"] == "started"
        peak = peak_rss_while_stalled(daemon)  # the client reads nothing more
    assert peak - base["process_resident_memory_bytes"] < RSS_SLACK, "a stalled stream is buffered in the daemon"
    assert_freed(daemon, base, "command stream")
    # the command went with its client, as it asked (kill_on_disconnect; without it the command is detached)
    procs = sandbox.commands.list()
    assert not [p for p in procs if p.running and "yes" in p.cmd], procs


def test_a_client_gone_mid_upload_is_freed(daemon: DaemonProc, sandbox: Sandbox) -> None:
    base = settled(daemon, scrape(daemon))
    u = urlsplit(daemon.url)
    declared = 256 << 20
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=30) as s:
        head = (
            f"PUT /v1/sandboxes/{sandbox.sandbox_id}/files?path=/work/upload HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
        )
        s.sendall(head.encode())
        for _ in range(64):
            s.sendall(b"u" * (64 << 10))  # 4 MiB of the 256 announced, then the client goes
        s.shutdown(socket.SHUT_RDWR)
    assert_freed(daemon, base, "upload")
    assert sandbox.commands.run("echo ok").stdout.strip() == "ok"


def test_disk_pressure_of_the_data_dir_is_in_metrics(daemon: DaemonProc, sandbox: Sandbox) -> None:
    """A first piece of issue 21.3: the data dir's free and total bytes, read at each scrape."""
    m = scrape(daemon)
    st = os.statvfs(daemon.data_dir)
    assert m["branchbox_data_dir_size_bytes"] == st.f_blocks * st.f_frsize
    # other programs write to the same filesystem meanwhile: the two reads agree within a margin
    assert abs(m["branchbox_data_dir_free_bytes"] - st.f_bavail * st.f_frsize) < 256 << 20
    assert 0 < m["branchbox_data_dir_free_bytes"] <= m["branchbox_data_dir_size_bytes"]
