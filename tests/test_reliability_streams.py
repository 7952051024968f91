"""Faults, tested (issue 21.5): a client that stops reading a stream (a file download, a streamed command's
output) or goes away mid-upload. The daemon holds a bounded amount meanwhile and frees everything once the client
is gone: its open agent calls, its file descriptors and (within a stated slack) its memory, all read from the
daemon's own /metrics (``branchbox_agent_open_calls``, ``process_open_fds``, ``process_resident_memory_bytes``)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from branchbox.sdk import Sandbox
from tests.conftest import DaemonProc
from tests.test_net_api import serve_in

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
        chunks = r.iter_raw()  # held: a dropped iterator closes the response (httpx 0.29)
        assert next(chunks)
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


# -- the port proxy, attach and PTY streams (issue 21.5: "a client that stops reading a stream") --------------


def _raw_socket(d: DaemonProc) -> socket.socket:
    u = urlsplit(d.url)
    return socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=30)


def _abandon(s: socket.socket) -> None:
    """Go away as a crashed client does: no close frame, no FIN handshake, a reset (SO_LINGER 0)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _upstream_connections(sbx: Sandbox, port: int) -> int:
    """Established TCP connections to ``port`` inside the sandbox (the proxy's to its server)."""
    script = f"awk '$2 ~ /:{port:04X}$/ && $4 == \"01\"' /proc/net/tcp /proc/net/tcp6 | wc -l"
    return int(sbx.commands.run(script).stdout)


def _freed_upstream(sbx: Sandbox, port: int) -> bool:
    for _ in range(100):
        if _upstream_connections(sbx, port) == 0:
            return True
        time.sleep(0.1)
    return False


def test_a_stalled_then_abandoned_port_proxy_download_is_freed(daemon: DaemonProc, sandbox: Sandbox) -> None:
    serve_in(sandbox, 8000)
    base = settled(daemon, scrape(daemon))
    url = sandbox.get_host(8000) + f"big?n={2 << 30}"
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == 2 << 30
        chunks = r.iter_raw()  # held: a dropped iterator closes the response (httpx 0.29)
        assert next(chunks)
        peak = peak_rss_while_stalled(daemon)  # the server in the sandbox writes 2 GiB; the client reads none
        assert _upstream_connections(sandbox, 8000) == 1
    assert peak - base["process_resident_memory_bytes"] < RSS_SLACK, "a stalled proxied body is buffered"
    assert_freed(daemon, base, "port proxy download")
    assert _freed_upstream(sandbox, 8000), "the proxy kept its connection to the sandbox's server"
    assert httpx.get(sandbox.get_host(8000) + "again", timeout=30).json()["path"] == "/again"


def test_a_port_proxy_websocket_client_that_stops_reading_then_vanishes_is_freed(
    daemon: DaemonProc, sandbox: Sandbox
) -> None:
    serve_in(sandbox, 8000)
    base = settled(daemon, scrape(daemon))
    where = urlsplit(sandbox.get_host(8000))  # a port's host, or the API's /v1/sandboxes/{id}/ports/8000/
    s = _raw_socket(daemon)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET {where.path.rstrip('/')}/ws HTTP/1.1\r\nHost: {where.netloc}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert s.recv(4096).startswith(b"HTTP/1.1 101")
    # 1 MiB binary messages that the sandbox echoes back, never read: once every buffer on the way is full, the
    # daemon must stop reading from the client (not queue the echoes), and our sends stall
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"w" * 4096)) * 256  # the mask repeats every 4 bytes
    frame = struct.pack("!BBQ", 0x82, 0x80 | 127, len(payload)) + mask + payload
    s.settimeout(0.5)
    sent = 0
    deadline = time.monotonic() + STALL_S
    peak = 0.0
    while time.monotonic() < deadline and sent < 512 << 20:
        try:
            sent += s.send(frame)
        except TimeoutError:
            peak = max(peak, scrape(daemon)["process_resident_memory_bytes"])
    peak = max(peak, peak_rss_while_stalled(daemon))
    print(f"WebSocket: {sent >> 20} MiB sent before the proxy stopped reading")
    assert sent < 512 << 20, "512 MiB went in while nobody read the echoes: no backpressure"
    assert _upstream_connections(sandbox, 8000) == 1
    _abandon(s)
    assert peak - base["process_resident_memory_bytes"] < RSS_SLACK, f"sent {sent >> 20} MiB: buffered"
    assert_freed(daemon, base, "port proxy WebSocket")
    assert _freed_upstream(sandbox, 8000), "the proxy kept its WebSocket to the sandbox's server"


@contextlib.contextmanager
def _ws(d: DaemonProc, path: str) -> Iterator[Any]:
    with connect(d.url.replace("http://", "ws://") + path, max_size=None, open_timeout=30) as ws:
        yield ws


def test_a_stalled_then_abandoned_attach_is_freed_and_the_command_keeps_running(
    daemon: DaemonProc, sandbox: Sandbox
) -> None:
    h = sandbox.commands.run("yes branchbox-attached-output", background=True)
    base = settled(daemon, scrape(daemon))
    with _ws(daemon, f"/v1/sandboxes/{sandbox.sandbox_id}/commands/{h.pid}/attach") as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "started"
        peak = peak_rss_while_stalled(daemon)
        _abandon(ws.socket)
    assert peak - base["process_resident_memory_bytes"] < RSS_SLACK, "a stalled attach is buffered in the daemon"
    assert_freed(daemon, base, "attach")
    procs = [p for p in sandbox.commands.list() if p.pid == h.pid]
    assert procs and procs[0].running, "an attach that went away must not take the command with it"
    assert h.kill()


def test_a_stalled_then_abandoned_pty_is_freed_and_its_shell_killed(daemon: DaemonProc, sandbox: Sandbox) -> None:
    base = settled(daemon, scrape(daemon))
    with _ws(daemon, f"/v1/sandboxes/{sandbox.sandbox_id}/pty") as ws:
        ws.send(json.dumps({"cmd": ["/bin/sh", "-c", "yes branchbox-pty-output"], "tag": "soak-pty"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "started"
        peak = peak_rss_while_stalled(daemon)
        _abandon(ws.socket)
    assert peak - base["process_resident_memory_bytes"] < RSS_SLACK, "a stalled PTY is buffered in the daemon"
    assert_freed(daemon, base, "pty")
    left = [p for p in sandbox.commands.list() if p.running and p.tag == "soak-pty"]
    assert not left, f"the PTY's command outlived its client (kill_on_disconnect is the default): {left}"
