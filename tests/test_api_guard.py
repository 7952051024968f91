"""The API against browsers, through a real daemon: the headers a browser sends for a foreign page, a DNS-rebinding
page and a page a sandbox serves; request body limits; tokens that are not ASCII. The daemon's fast path
(daemon/http_front.py) and the app's routes are both reached, so both are checked."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from branchbox.api.auth import generate_api_key, hash_api_key
from branchbox.api.guard import Guard, hostname
from branchbox.api.settings import ApiSettings
from branchbox.sdk import PermissionDeniedError, Sandbox
from branchbox.sdk._requests import raise_for_status
from tests.conftest import DaemonProc, templates_dir
from tests.test_net_api import serve_in

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
EVIL = "http://evil.example"


def _code(resp: httpx.Response) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]["code"]


def _raw(port: int, request: bytes) -> bytes:
    """One request in one write (the shape http_front answers without ASGI); the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _sock(port: int) -> socket.socket:
    """A connection to the daemon, for a WebSocket whose URL names another host (a sandbox port's)."""
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_guard_rules() -> None:
    g = Guard(ApiSettings(allowed_hosts=("api.example", ".corp.example"), allowed_origins=("http://localhost:3000",)))
    assert [hostname(h) for h in ("LocalHost:7077", "[::1]:80", "a.b.", "::1")] == ["localhost", "::1", "a.b", "::1"]
    good = ("localhost:7077", "api.localhost:7077", "127.0.0.1", "10.1.2.3:9", "[::1]:7077", "api.example")
    for ok in (*good, "x.corp.example:1", None):
        assert g.host_allowed(ok), ok
    bad_hosts = ("evil.example", "localhost.evil.example", "corp.example", "localhost.example", "api.example.evil")
    for bad in (*bad_hosts, "7077-x.localhost.evil"):
        assert not g.host_allowed(bad), bad
    assert g.port_target("8000-0123abcd.localhost:7077") == (8000, "0123abcd")
    assert g.port_target("8000-0123abcd.localhost.evil.example") is None
    assert g.port_target("localhost:7077") is None

    def err(**h: str) -> str | None:
        e = g.api_error([(k.replace("_", "-").encode(), v.encode()) for k, v in h.items()])
        return None if e is None else e.code

    assert err(host="localhost:7077") is None
    assert err(host="localhost:7077", origin="http://localhost:7077") is None  # the API's own page (/docs)
    assert err(host="localhost:7077", origin="http://localhost:3000") is None  # configured
    assert err(host="localhost:7077", origin="http://localhost:3001") == "origin_not_allowed"
    assert err(host="localhost:7077", origin="null") == "origin_not_allowed"
    assert err(host="localhost:7077", sec_fetch_site="cross-site") == "origin_not_allowed"
    assert err(host="localhost:7077", sec_fetch_site="same-site") == "origin_not_allowed"  # {port}-{id}.localhost
    assert err(host="localhost:7077", sec_fetch_site="none") is None  # typed into the address bar
    assert err(host="evil.example:7077", origin="http://evil.example:7077") == "host_not_allowed"  # rebinding
    assert Guard(ApiSettings(allowed_hosts=("*",))).host_allowed("anything.example")
    # an E2B signed file URL is made for browsers: its Host is checked, not its Origin
    assert g.api_error([(b"host", b"localhost"), (b"origin", EVIL.encode())], signed=True) is None
    assert g.api_error([(b"host", b"evil.example")], signed=True) is not None


def test_browser_requests_to_the_api_are_refused(daemon_factory: Any) -> None:
    """A keyless loopback daemon: foreign pages (Origin, Sec-Fetch-Site) and DNS rebinding (a foreign Host) get
    403 with stable codes on every route, the fast path's included, and change nothing."""
    d: DaemonProc = daemon_factory(env={"BRANCHBOX_MAX_BODY_BYTES": "65536"})
    c = httpx.Client(base_url=d.url, timeout=60)
    sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
    assert c.get("/v1/sandboxes", headers={"host": f"localhost:{d.port}"}).status_code == 200
    rebinding = {"host": f"evil.example:{d.port}", "origin": f"{EVIL}:{d.port}"}
    foreign = {"origin": EVIL}
    for headers, code in (
        (rebinding, "host_not_allowed"),
        ({"host": "evil.example"}, "host_not_allowed"),
        (foreign, "origin_not_allowed"),
        ({"origin": "null"}, "origin_not_allowed"),  # a sandboxed document, a file:// page
        ({"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}, "origin_not_allowed"),  # <img src=...>
    ):
        refused = c.get("/v1/sandboxes", headers=headers)
        assert _code(refused) == (403, code)
        # the SDK's table makes it a typed error whose message names the setting to change
        with pytest.raises(PermissionDeniedError, match=r"allowed_hosts|allowed_origins") as info:
            raise_for_status(refused.status_code, refused.content)
        assert (info.value.code, info.value.status) == (code, 403)
        assert _code(c.get(f"/v1/sandboxes/{sid}", headers=headers)) == (403, code)  # a fast-path route
        assert _code(c.post("/v1/sandboxes", json={}, headers=headers)) == (403, code)  # fast path
        run = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "touch /tmp/pwned"}, headers=headers)
        assert _code(run) == (403, code)
        net = c.patch(f"/v1/sandboxes/{sid}/network", json={"allow_out": ["10.0.0.0/8"]}, headers=headers)
        assert _code(net) == (403, code)
    # one whole request in one write: the daemon's own HTTP parser answers these without ASGI
    for host in (f"evil.example:{d.port}", f"localhost:{d.port}\r\nOrigin: {EVIL}"):
        answer = _raw(d.port, b"POST /v1/sandboxes HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 2\r\nConnection: close\r\n\r\n{}" % host.encode())  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    # the API's own page (Swagger UI at /docs) is same-origin
    own = c.get("/v1/sandboxes", headers={"origin": d.url, "sec-fetch-site": "same-origin"})
    assert own.status_code == 200
    assert [s["sandbox_id"] for s in own.json()] == [sid]  # nothing was created
    assert c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "test -e /tmp/pwned"}).json()["exit_code"] == 1
    assert c.get(f"/v1/sandboxes/{sid}/network").json()["allow_out"] == []
    # WebSockets: refused before they are accepted (the handshake gets 403)
    ws = d.url.replace("http://", "ws://", 1)
    with pytest.raises(InvalidStatus) as info:
        ws_connect(f"{ws}/v1/sandboxes/{sid}/pty", origin=EVIL, open_timeout=30)  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    # request bodies: 413 payload_too_large, by Content-Length or when a chunked body passes the limit
    big = b"{" + b" " * 70000 + b"}"
    assert _code(c.post("/v1/sandboxes", content=big, headers={"content-type": "application/json"})) == (
        413,
        "payload_too_large",
    )
    chunked = c.post(
        f"/v1/sandboxes/{sid}/commands",
        content=iter([big[:40000], big[40000:]]),
        headers={"content-type": "application/json"},
    )
    assert _code(chunked) == (413, "payload_too_large")
    assert "max_body_bytes" in chunked.json()["error"]["message"]
    # uploads have their own, larger limit
    blob = b"x" * 200_000
    assert c.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/blob"}, content=blob).status_code == 200
    assert c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/blob"}).content == blob
    c.close()


def test_a_page_served_by_a_sandbox_cannot_use_the_api(daemon_factory: Any) -> None:
    """The sandbox's page is on its own origin ({port}-{id}.localhost); its script's requests to the API carry
    that origin and are refused; the same names under the sandbox's host reach the sandbox, never the API; the
    old path under the API's host serves the page in an opaque origin (CSP sandbox)."""
    d: DaemonProc = daemon_factory()
    with Sandbox.create(base_url=d.url) as sbx, Sandbox.create(base_url=d.url) as victim:
        serve_in(sbx)
        page_host = f"8000-{sbx.sandbox_id}.localhost:{d.port}"
        page_origin = f"http://{page_host}"
        page = httpx.get(f"{d.url}/index.html?x=1", headers={"host": page_host}, timeout=30)
        assert page.status_code == 200 and page.headers["x-sandbox"] == "yes"
        assert page.json()["path"] == "/index.html?x=1"
        # the page's script: fetch('/v1/sandboxes') stays on its own origin, i.e. goes to the sandbox
        own = httpx.get(f"{d.url}/v1/sandboxes", headers={"host": page_host, "origin": page_origin}, timeout=30)
        assert own.headers["x-sandbox"] == "yes" and own.json()["path"] == "/v1/sandboxes"
        # fetch('http://localhost:PORT/v1/...') to the API: cross-origin, refused
        browser = {"host": f"localhost:{d.port}", "origin": page_origin, "sec-fetch-site": "same-site"}
        for method, path, body in (
            ("GET", "/v1/sandboxes", None),
            ("POST", f"/v1/sandboxes/{victim.sandbox_id}/commands", {"cmd": "touch /tmp/pwned"}),
            ("PATCH", f"/v1/sandboxes/{sbx.sandbox_id}/network", {"allow_out": ["0.0.0.0/0"]}),
        ):
            resp = httpx.request(method, f"{d.url}{path}", json=body, headers=browser, timeout=30)
            assert _code(resp) == (403, "origin_not_allowed"), path
        assert not victim.files.exists("/tmp/pwned")
        assert sbx.get_network().allow_out == []
        # the path under the API's host (get_host) marks its pages as sandboxed: opaque origin, Origin: null
        legacy = httpx.get(sbx.get_host(8000), timeout=30)
        assert legacy.status_code == 200 and legacy.headers["content-security-policy"].startswith("sandbox ")
        assert "allow-same-origin" not in legacy.headers["content-security-policy"]
        null = httpx.get(f"{d.url}/v1/sandboxes", headers={"origin": "null"}, timeout=30)
        assert _code(null) == (403, "origin_not_allowed")
        # WebSocket on the page's host
        with ws_connect(f"ws://{page_host}/ws", sock=_sock(d.port), open_timeout=30) as ws:
            ws.send("same origin")
            assert ws.recv(timeout=30) == "same origin"
        # a port with nothing behind it
        missing = httpx.get(d.url, headers={"host": f"8001-{sbx.sandbox_id}.localhost"}, timeout=30)
        assert _code(missing) == (502, "port_unreachable")


def test_port_hosts_need_a_token_when_the_daemon_requires_keys(daemon_factory: Any) -> None:
    key = generate_api_key()
    d: DaemonProc = daemon_factory(
        api_key=key, env={"BRANCHBOX_API_KEY_HASHES": hash_api_key(key), "BRANCHBOX_REQUIRE_AUTH": "true"}
    )
    with Sandbox.create(base_url=d.url, api_key=key) as sbx, Sandbox.create(base_url=d.url, api_key=key) as other:
        serve_in(sbx)
        host = {"host": f"8000-{sbx.sandbox_id}.localhost:{d.port}"}
        assert _code(httpx.get(d.url, headers=host, timeout=30)) == (401, "unauthorized")
        token = sbx.get_network().port_token
        first = httpx.get(f"{d.url}/a", params={"bb_token": token}, headers=host, timeout=30)
        assert first.status_code == 200 and first.json()["path"] == "/a"  # the token is not forwarded
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"bb_token={token};") and "HttpOnly" in cookie and "Domain" not in cookie
        # the page's next requests carry the cookie (not the query); other cookies go through, ours does not
        later = httpx.get(f"{d.url}/b", headers={**host, "cookie": f"app=1; bb_token={token}"}, timeout=30)
        assert later.status_code == 200 and later.json()["headers"]["cookie"] == "app=1"
        assert "set-cookie" not in later.headers
        foreign = {"host": f"8000-{other.sandbox_id}.localhost:{d.port}", "cookie": f"bb_token={token}"}
        assert _code(httpx.get(d.url, headers=foreign, timeout=30)) == (401, "unauthorized")
        # a token that is not ASCII is a wrong token (401), not an internal error
        for bad in ("é" * 40, "\u2603"):
            resp = httpx.get(f"{d.url}/", params={"bb_token": bad}, headers=host, timeout=30)
            assert _code(resp) == (401, "unauthorized")
        resp = httpx.get(f"{d.url}/v1/sandboxes", headers={"authorization": b"Bearer \xc3\xa9\xff"}, timeout=30)
        assert _code(resp) == (401, "unauthorized")
        page = f"ws://{host['host']}/ws"
        with ws_connect(page, sock=_sock(d.port), additional_headers={"x-branchbox-token": token}) as ws:
            ws.send("with token")
            assert ws.recv(timeout=30) == "with token"
        with pytest.raises(InvalidStatus):
            ws_connect(page, sock=_sock(d.port), open_timeout=30)
        # the API's WebSockets check the key before accepting
        with pytest.raises(InvalidStatus) as info:
            ws_connect(f"ws://127.0.0.1:{d.port}/v1/sandboxes/{sbx.sandbox_id}/pty", open_timeout=30)
        assert info.value.response.status_code == 403


def test_error_messages_name_no_host_paths(daemon: DaemonProc) -> None:
    """Errors an API caller can provoke (issue 22.8) say what to change without the daemon's host paths: no data
    dir, template store or other host directory appears in a message or its details."""
    c = httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=60)
    sid = c.post("/v1/sandboxes", json={}).json()["sandbox_id"]
    try:
        box = f"/v1/sandboxes/{sid}"
        probes: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/v1/sandboxes", {"json": {"template": "nosuch"}}),
            ("POST", "/v1/sandboxes", {"json": {"template": "../../etc"}}),
            ("POST", "/v1/sandboxes", {"json": {"snapshot": "nosuch"}}),
            ("GET", f"{box}/files", {"params": {"path": "/nope"}}),
            ("GET", f"{box}/files", {"params": {"path": "/etc"}}),
            ("PUT", f"{box}/files", {"params": {"path": "/etc/hostname/x"}, "content": b"x"}),
            ("POST", f"{box}/commands", {"json": {"cmd": "true", "cwd": "/nope"}}),
            ("POST", f"{box}/commands", {"json": {"cmd": "true", "user": "nouser"}}),
            ("POST", f"{box}/snapshots", {"json": {"name": "../x"}}),
            ("DELETE", "/v1/snapshots/nosuch", {}),
            ("POST", "/v1/workspaces", {"json": {"repository_url": "file:///etc"}}),
            ("POST", "/v1/workspaces", {"json": {"repository_url": "https://127.0.0.1:1/x.git"}}),
            ("POST", "/v1/templates/import", {"json": {"reference": "docker://127.0.0.1:1/x:y", "name": "x"}}),
        ]
        host_dirs = {str(daemon.data_dir), str(templates_dir()), "/var/lib/", "/var/tmp/", "/run/", "/sys/fs/cgroup"}
        for method, path, kw in probes:
            r = c.request(method, path, **kw)
            body = r.text
            assert r.status_code >= 400 or '"error"' in body, (method, path, r.status_code, body)  # NDJSON: in-stream
            assert not [d for d in host_dirs if d in body], (method, path, body)
    finally:
        c.delete(f"/v1/sandboxes/{sid}")
        c.close()
