"""Networking through a real daemon: the SDK and HTTP network endpoints, and the port proxy (HTTP, streaming,
WebSocket, auth by API key or per-sandbox token). Sandboxes reach the tests' own internet only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from branchbox.api.auth import generate_api_key, hash_api_key
from branchbox.sdk import BadRequestError, Sandbox
from tests.conftest import DaemonProc
from tests.net_env import Internet

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
SERVER = (Path(__file__).parent / "sandbox_server.py").read_text()


@pytest.fixture
def net_daemon(daemon_factory: Any, internet: Internet) -> DaemonProc:
    d: DaemonProc = daemon_factory(env={"BRANCHBOX_NETWORK_DNS_UPSTREAM": internet.dns})
    return d


def serve_in(sbx: Sandbox, port: int = 8000, bind: str = "0.0.0.0") -> None:
    """Start the echo server in the sandbox and wait until the proxy reaches it."""
    sbx.files.write("/tmp/server.py", SERVER)
    sbx.commands.run(f"python3 /tmp/server.py {port} {bind}", background=True)
    url = sbx.get_host(port)
    deadline = time.monotonic() + 60
    while True:  # readiness of a process in another namespace: nothing to wait on but the port itself
        if httpx.get(url, timeout=10).status_code == 200:
            return
        assert time.monotonic() < deadline, "the sandbox's server did not start"
        time.sleep(0.05)


def test_network_settings_through_the_sdk(net_daemon: DaemonProc, internet: Internet) -> None:
    with Sandbox.create(
        base_url=net_daemon.url,
        allow_internet_access=True,
        network={"allow_out": [internet.public_a, "a.example.test"], "deny_out": ["0.0.0.0/0"]},
    ) as sbx:
        net = sbx.get_network()
        assert net.allow_out == [f"{internet.public_a}/32", "a.example.test"]
        # DNS through the daemon's forwarder (the daemon runs uvloop when installed)
        assert sbx.commands.run("getent hosts a.example.test").stdout.split()[0] == internet.public_a
        assert net.deny_out == ["0.0.0.0/0"]
        assert net.address.startswith(net_daemon.network.subnet.split(".")[0] + ".")
        ok = f"import socket; socket.create_connection(('{internet.public_b}', 80), timeout=1).close()"
        assert sbx.commands.run(["python3", "-c", ok]).exit_code != 0
        updated = sbx.update_network({"deny_out": []})
        assert updated.deny_out == [] and updated.allow_out == net.allow_out
        assert sbx.commands.run(["python3", "-c", ok]).exit_code == 0
        with pytest.raises(BadRequestError) as exc:
            sbx.update_network({"allow_out": ["no such thing!"]})
        assert exc.value.code == "invalid_network_policy"
        # PUT replaces the whole policy (absent keys take their defaults)
        base = f"{net_daemon.url}/v1/sandboxes/{sbx.sandbox_id}/network"
        body = httpx.put(base, json={"allow_internet_access": False}, timeout=30).json()
        assert body["allow_internet_access"] is False and body["allow_out"] == [] and body["deny_out"] == []
        assert httpx.patch(base, json={"egress": 1}, timeout=30).status_code == 400


def test_invalid_network_at_create_is_a_400(net_daemon: DaemonProc) -> None:
    resp = httpx.post(f"{net_daemon.url}/v1/sandboxes", json={"network": {"allow_out": ["1.2.3.4/40"]}}, timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_network_policy"
    assert httpx.get(f"{net_daemon.url}/v1/sandboxes", timeout=30).json() == []


def test_port_proxy_http(net_daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=net_daemon.url) as sbx:
        serve_in(sbx)
        url = sbx.get_host(8000)
        assert url == f"{net_daemon.url}/v1/sandboxes/{sbx.sandbox_id}/ports/8000/"
        resp = httpx.get(url + "some/path?x=1&y=2", timeout=30)
        assert resp.status_code == 200 and resp.headers["x-sandbox"] == "yes"
        assert resp.json()["path"] == "/some/path?x=1&y=2"
        assert httpx.get(url + "a%2Fb%20c", timeout=30).json()["path"] == "/a%2Fb%20c"  # forwarded as sent
        echoed = httpx.post(url + "echo", content=b"hello body", timeout=30).json()
        assert (echoed["method"], echoed["body"]) == ("POST", "hello body")
        assert httpx.request("DELETE", url + "x", timeout=30).json()["method"] == "DELETE"
        with httpx.stream("GET", url + "big?n=5000000", timeout=60) as big:
            assert sum(len(c) for c in big.iter_raw()) == 5_000_000
        # a server that closes after each response (HTTP/1.0) must get no body it does not expect: unread bytes
        # make its close() reset the connection under the response
        sbx.commands.run("mkdir -p /tmp/www && head -c 20000000 /dev/urandom > /tmp/www/blob")
        sbx.commands.run("python3 -m http.server 8002 --bind 0.0.0.0 --directory /tmp/www", background=True)
        blob = sbx.files.read("/tmp/www/blob", format="bytes")
        plain = sbx.get_host(8002) + "blob"
        deadline = time.monotonic() + 60
        while httpx.head(plain, timeout=10).status_code != 200:  # readiness of the sandbox's server
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(3):
            got = httpx.get(plain, timeout=60)
            assert got.status_code == 200
            assert got.headers["content-length"] == str(len(blob))
            assert got.content == blob
        missing = httpx.get(f"{net_daemon.url}/v1/sandboxes/{sbx.sandbox_id}/ports/8001/", timeout=30)
        assert missing.status_code == 502
        assert missing.json()["error"]["code"] == "port_unreachable"
    gone = httpx.get(f"{net_daemon.url}/v1/sandboxes/{sbx.sandbox_id}/ports/8000/", timeout=30)
    assert gone.status_code == 404


def test_port_proxy_websocket(net_daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=net_daemon.url) as sbx:
        serve_in(sbx)
        ws_url = sbx.get_host(8000).replace("http://", "ws://", 1) + "ws"
        with ws_connect(ws_url, open_timeout=30) as ws:
            ws.send("hello")
            assert ws.recv(timeout=30) == "hello"
            ws.send(b"\x00\x01binary")
            assert ws.recv(timeout=30) == b"\x00\x01binary"
            big = "y" * 200_000
            ws.send(big)
            assert ws.recv(timeout=30) == big


def test_port_proxy_reaches_a_server_on_the_sandboxs_loopback(net_daemon: DaemonProc) -> None:
    """A dev server's default (flask run, Django, Jupyter, Vite: 127.0.0.1) is reached through the sandbox's own
    loopback, for HTTP and WebSocket; nothing listening still says so."""
    with Sandbox.create(base_url=net_daemon.url) as sbx:
        serve_in(sbx, 8000, bind="127.0.0.1")
        listening = sbx.commands.run("cat /proc/net/tcp").stdout  # local addresses in hex: 127.0.0.1:8000 only
        assert "0100007F:1F40" in listening and "00000000:1F40" not in listening
        url = sbx.get_host(8000)
        resp = httpx.post(url + "echo?q=1", content=b"to loopback", timeout=30)
        assert resp.status_code == 200 and resp.headers["x-sandbox"] == "yes"
        assert resp.json()["body"] == "to loopback"
        with ws_connect(url.replace("http://", "ws://", 1) + "ws", open_timeout=30) as ws:
            ws.send("over loopback")
            assert ws.recv(timeout=30) == "over loopback"
        missing = httpx.get(sbx.get_host(8001), timeout=30)
        assert missing.status_code == 502 and "on its address or on 127.0.0.1" in missing.json()["error"]["message"]


def test_port_proxy_auth_with_api_key_or_sandbox_token(daemon_factory: Any) -> None:
    key = generate_api_key()
    d: DaemonProc = daemon_factory(
        api_key=key, env={"BRANCHBOX_API_KEY_HASHES": hash_api_key(key), "BRANCHBOX_REQUIRE_AUTH": "true"}
    )
    with Sandbox.create(base_url=d.url, api_key=key) as sbx:
        serve_in(sbx)
        bare = f"{d.url}/v1/sandboxes/{sbx.sandbox_id}/ports/8000/"
        assert httpx.get(bare, timeout=30).status_code == 401
        assert httpx.get(bare, params={"bb_token": "0" * 40}, timeout=30).status_code == 401
        with_key = httpx.get(bare + "k", headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert with_key.status_code == 200
        assert "authorization" not in with_key.json()["headers"], "the daemon's API key must not reach the sandbox"
        url = sbx.get_host(8000)  # carries the sandbox's token: works without the key
        assert "bb_token=" in url
        app_auth = httpx.get(url, headers={"authorization": "Bearer app-secret"}, timeout=30).json()
        assert app_auth["path"] == "/"  # the token is not forwarded...
        assert app_auth["headers"]["authorization"] == "Bearer app-secret"  # ...the app's own header is
        token = sbx.get_network().port_token
        assert httpx.get(bare, headers={"x-branchbox-token": token}, timeout=30).status_code == 200
        with ws_connect(url.replace("http://", "ws://", 1), open_timeout=30) as ws:
            ws.send("via token")
            assert ws.recv(timeout=30) == "via token"
        # a token opens only its own sandbox
        with Sandbox.create(base_url=d.url, api_key=key) as other:
            foreign = f"{d.url}/v1/sandboxes/{other.sandbox_id}/ports/8000/?bb_token={token}"
            assert httpx.get(foreign, timeout=30).status_code == 401


def test_cli_network_and_port(net_daemon: DaemonProc, internet: Internet) -> None:
    from tests.test_cli import bb

    url = net_daemon.url
    made = bb("create", "--no-internet", "--allow-out", internet.public_a, "--json", url=url)
    assert made.returncode == 0, made.stderr
    sid = json.loads(made.stdout)["sandbox_id"]
    shown = json.loads(bb("network", sid, url=url).stdout)
    assert shown["allow_internet_access"] is False
    assert shown["allow_out"] == [f"{internet.public_a}/32"]
    changed = bb("network", sid, "--internet", "--allow-out", "", "--deny-out", "b.example.test", url=url)
    assert changed.returncode == 0, changed.stderr
    after = json.loads(changed.stdout)
    assert (after["allow_internet_access"], after["allow_out"], after["deny_out"]) == (True, [], ["b.example.test"])
    bad = bb("network", sid, "--allow-out", "nope nope", url=url)
    assert bad.returncode == 1
    assert "invalid_network_policy" in bad.stderr
    assert bb("port", sid, "8000", url=url).stdout.strip() == f"{url}/v1/sandboxes/{sid}/ports/8000/"
    assert bb("rm", sid, url=url).returncode == 0
