"""The controller's HTTP front against one real daemon that requires API keys, without Ray: the controller is fed
one push by hand (as its inbox would), served by uvicorn on loopback, and reached with the SDK as a user does.

It checks what the Ray test does not: the caller's key goes with the create to the node (the create is sent over
pooled keep-alive connections, not httpx, so the header is passed by hand), a wrong key is the node's own
``unauthorized`` and reserves nothing, and a burst of short-lived sandboxes through the controller does not wait
for the node's next push (a destroy gives its create's held room back at once)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from branchbox import Sandbox, sdk
from branchbox.api.auth import ApiKeyChecker, hash_api_key
from branchbox.fleet.controller import Controller, ControllerSettings
from branchbox.fleet.proxy import FleetFront, create_fleet_app
from branchbox.sdk import AuthenticationError, FileNotFoundError_
from branchbox.sdk._wire import close_shared
from branchbox.workspaces.testing import GitDaemon
from tests.conftest import DaemonProc, free_port, new_data_dir
from tests.test_workspaces import git_base, git_daemon  # noqa: F401 - session fixtures shared with that module

KEY = "fleet-front-key-0123456789"


def checker(*keys: str) -> ApiKeyChecker:
    return ApiKeyChecker([hash_api_key(k) for k in keys], required=True)


class Front:
    """A controller with no Ray, its front served by uvicorn in a thread of its own."""

    def __init__(self, node_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        # no push comes after the first one (nothing drains an inbox here, hence no heartbeat verdict for an
        # hour): every room a create finds after the first one is room the controller gave back itself
        settings = ControllerSettings(address="unused", placement_timeout=2.0, stale_after=3600.0)
        self.controller = Controller(settings)
        self.front = FleetFront(self.controller, keys=checker(KEY), version="test")
        config = uvicorn.Config(
            create_fleet_app(self.front), host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            threading.Event().wait(0.05)
        assert self.server.started, "the fleet front did not start"
        self.push("n0", node_url)

    def push(self, node: str, url: str) -> None:
        """A node's push, as the inbox would hand it over (on the controller's loop)."""
        cap = {"memory_mb": 512, "cpu_millis": 1000, "running": 0, "templates": [["default", "container"]],
               "warm": []}  # fmt: skip
        msg = {"node": node, "url": url, "labels": {}, "incarnation": "a", "seq": 1, "capacity": cap}

        async def apply() -> None:
            self.controller.apply(msg)

        asyncio.run_coroutine_threadsafe(apply(), self.loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self.loop.run_until_complete(self.front.aclose())
        self.loop.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def keyed(default_template: Any) -> Iterator[tuple[DaemonProc, Front]]:
    keyed_env = {"BRANCHBOX_API_KEY_HASHES": hash_api_key(KEY), "BRANCHBOX_REQUIRE_AUTH": "true"}
    daemon = DaemonProc(new_data_dir(), api_key=KEY, env=keyed_env)
    front = None
    try:
        daemon.start()
        front = Front(daemon.url)
        yield daemon, front
    finally:
        if front is not None:
            front.stop()
        daemon.cleanup()
        close_shared()


def test_the_callers_key_goes_to_the_node_and_a_burst_does_not_wait_for_pushes(
    keyed: tuple[DaemonProc, Front],
) -> None:
    daemon, front = keyed
    # the node offers room for one 512 MiB sandbox, and no push will come: three in a row each get the room
    # the previous one gave back when it was killed through the controller
    for _ in range(3):
        sbx = Sandbox.create(base_url=front.url, api_key=KEY, memory_mb=512)
        try:
            assert sbx.commands.run("echo hi").stdout == "hi\n"
            timings = sbx.info.timings
            assert {"fleet_allocate", "fleet_node_call", "fleet_total"} <= set(timings)
            # it is on the node, which checked the same key
            on_node = httpx.get(f"{daemon.url}/v1/sandboxes/{sbx.sandbox_id}", headers=daemon.headers, timeout=10)
            assert on_node.status_code == 200
        finally:
            sbx.kill()
    assert front.controller.registry.get("n0").memory_mb == 512


def test_a_key_the_node_refuses_is_its_own_error_and_reserves_nothing(keyed: tuple[DaemonProc, Front]) -> None:
    daemon, front = keyed
    # the controller's own check first: no key at all is refused before anything is allocated
    with pytest.raises(AuthenticationError):
        Sandbox.create(base_url=front.url, api_key=None, memory_mb=512)
    # a key the controller takes but the node does not (a fleet whose key files differ): the node's answer
    front.front.keys = checker(KEY, "only-the-controller-knows-this")
    try:
        resp = httpx.post(
            f"{front.url}/v1/sandboxes",
            json={"memory_mb": 512},
            headers={"authorization": "Bearer only-the-controller-knows-this"},
            timeout=30,
        )
    finally:
        front.front.keys = checker(KEY)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "unauthorized"
    # bodies the controller must read to place a sandbox: a clear 400 each, nothing reserved or made
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for raw in (b"[1]", b"{", b'{"cpu": Infinity}', b'{"cpu": 1e400}', b'{"cpu": NaN}', b'{"memory_mb": "x"}',
                b'{"metadata": {"fleet.labels": "region"}}'):  # fmt: skip
        bad = httpx.post(f"{front.url}/v1/sandboxes", content=raw, headers=auth, timeout=30)
        assert bad.status_code == 400, (raw, bad.text)
        assert bad.json()["error"]["code"] == "bad_request", raw
    # a negative size reserves no negative room (which would make the node look bigger): the node refuses it
    neg = httpx.post(f"{front.url}/v1/sandboxes", json={"memory_mb": -4096}, headers=auth, timeout=30)
    assert neg.status_code == 400 and neg.json()["error"]["code"] == "bad_request", neg.text
    assert front.controller.registry.get("n0").memory_mb == 512
    assert front.controller.registry.get("n0").memory_mb == 512  # released
    listed = httpx.get(f"{daemon.url}/v1/sandboxes", headers=daemon.headers, timeout=10).json()
    assert listed == []


def test_a_workspace_through_the_controller(keyed: tuple[DaemonProc, Front], git_daemon: GitDaemon) -> None:  # noqa: F811
    """A git workspace is placed like a create, and its routes and its sandbox's go to its node."""
    daemon, front = keyed
    url = git_daemon.url("repo.git")
    with sdk.Workspace.create(url, branch="main", base_url=front.url, api_key=KEY) as ws:
        assert ws.info.status == "ready" and len(ws.commit or "") == 40
        assert {"fleet_allocate", "fleet_node_call"} <= set(ws.info.timings)
        head = ws.sandbox.commands.run("git rev-parse HEAD", cwd=ws.path)  # the sandbox, through the controller
        assert head.stdout == f"{ws.commit}\n"
        # it is on the node, and the controller lists and finds it there
        on_node = httpx.get(f"{daemon.url}/v1/workspaces/{ws.workspace_id}", headers=daemon.headers, timeout=10)
        assert on_node.status_code == 200
        assert [w.workspace_id for w in sdk.Workspace.list(base_url=front.url, api_key=KEY)] == [ws.workspace_id]
        front.controller.workspace_owners.clear()  # a controller that restarted: it asks the nodes
        assert sdk.Workspace.get(ws.workspace_id, base_url=front.url, api_key=KEY).commit == ws.commit
        wid, sid = ws.workspace_id, ws.info.sandbox_id
    assert httpx.get(f"{daemon.url}/v1/sandboxes/{sid}", headers=daemon.headers, timeout=10).status_code == 404
    with pytest.raises(sdk.NotFoundError) as info:
        sdk.Workspace.get(wid, base_url=front.url, api_key=KEY)
    assert info.value.code == "workspace_not_found"
    # the node's own errors pass through with their codes, and reserve nothing
    with pytest.raises(sdk.NotFoundError) as missing:
        sdk.Workspace.create(url, branch="no-such", base_url=front.url, api_key=KEY)
    assert missing.value.code == "ref_not_found"
    assert front.controller.registry.get("n0").memory_mb == 512


def test_warm_pools_through_the_controller(keyed: tuple[DaemonProc, Front]) -> None:
    """A pool configured through the controller is made on the nodes holding its template and counted for the
    fleet; settings the node refuses configure nothing; removed everywhere."""
    daemon, front = keyed
    kw = {"base_url": front.url, "api_key": KEY}
    with pytest.raises(sdk.NotFoundError) as none:
        Sandbox.get_pool("default", **kw)
    assert none.value.code == "not_found"
    with pytest.raises(sdk.NotFoundError) as unheld:  # no node holds it: nothing to configure
        Sandbox.configure_pool("no-such-template", min_size=1, memory_mb=256, **kw)
    assert unheld.value.code == "template_not_found"
    with pytest.raises(sdk.BadRequestError):  # the node's own check of the settings: configured nowhere
        Sandbox.configure_pool("default", min_size=5, max_size=1, **kw)
    assert httpx.get(f"{daemon.url}/v1/pools", headers=daemon.headers, timeout=10).json() == []
    try:
        got = Sandbox.configure_pool("default", min_size=1, target_free=1, max_size=1, memory_mb=256, **kw)
        assert (got.template, got.target) == ("default", 1)
        on_node = httpx.get(f"{daemon.url}/v1/pools/default", headers=daemon.headers, timeout=10)
        assert on_node.status_code == 200 and on_node.json()["config"]["memory_mb"] == 256
        pools = Sandbox.pools(**kw)
        assert [(p.template, p.target) for p in pools] == [("default", 1)]
        one = httpx.get(f"{front.url}/v1/pools/default", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        assert one.status_code == 200 and one.headers["x-branchbox-nodes"] == "n0"
        # a node that joins later gets the fleet's pool (as a DaemonSet's pods go to new nodes)
        second = DaemonProc(new_data_dir(), api_key=KEY, env=daemon.extra_env)
        try:
            second.start()
            front.push("n1", second.url)
            deadline = time.monotonic() + 30
            while (
                late := httpx.get(f"{second.url}/v1/pools/default", headers=daemon.headers, timeout=10)
            ).status_code != 200:
                assert time.monotonic() < deadline, late.text
                time.sleep(0.1)
            assert late.json()["config"]["memory_mb"] == 256
            summed = Sandbox.get_pool("default", **kw)
            assert summed.target == 2  # one member per node, summed for the fleet
        finally:
            Sandbox.remove_pool("default", **kw)
            try:
                assert httpx.get(f"{second.url}/v1/pools", headers=daemon.headers, timeout=10).json() == []
            finally:
                second.cleanup()
                asyncio.run_coroutine_threadsafe(_remove(front, "n1"), front.loop).result(10)
    finally:
        with contextlib.suppress(sdk.NotFoundError):
            Sandbox.remove_pool("default", **kw)
    assert httpx.get(f"{daemon.url}/v1/pools", headers=daemon.headers, timeout=10).json() == []
    with pytest.raises(sdk.NotFoundError):
        Sandbox.remove_pool("default", **kw)
    # a node that does not answer: named, with the nodes that were changed
    front.push("n9", "http://127.0.0.1:9")  # the discard port: nothing listens there over TCP
    try:
        with pytest.raises(sdk.ServerError) as put:
            Sandbox.configure_pool("default", min_size=0, target_free=0, max_size=1, memory_mb=256, **kw)
        assert put.value.code == "node_unreachable" and "'n9'" in put.value.message
        assert "configured on n0 already" in put.value.message
        with pytest.raises(sdk.ServerError) as rm:
            Sandbox.remove_pool("default", **kw)
        assert rm.value.code == "node_unreachable" and "removed on n0 already" in rm.value.message
    finally:
        asyncio.run_coroutine_threadsafe(_remove(front, "n9"), front.loop).result(10)
    assert httpx.get(f"{daemon.url}/v1/pools", headers=daemon.headers, timeout=10).json() == []


async def _remove(front: Front, node: str) -> None:
    front.controller.registry.remove(node)


def test_bodies_stream_both_ways_through_the_controller(keyed: tuple[DaemonProc, Front], tmp_path: Path) -> None:
    """The controller forwards a sandbox's routes over its pooled connections to the node: a large upload streamed
    chunked (a file object), small bodies with their length, query strings, a large download, a directory as one
    tar each way, and the node's errors as they are; a bad query reaches the node unchanged."""
    _, front = keyed
    big = tmp_path / "big"
    big.write_bytes(os.urandom(24 << 20))
    with Sandbox.create(base_url=front.url, api_key=KEY, memory_mb=512) as sbx:
        with big.open("rb") as f:
            assert sbx.files.write("/tmp/big", f).size == 24 << 20
        out = io.BytesIO()
        assert sbx.files.download("/tmp/big", out) == 24 << 20
        assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(big.read_bytes()).digest()
        sbx.files.write("/tmp/a b&c=d.txt", "query strings survive")  # escaped in the query, decoded on the node
        assert sbx.files.read("/tmp/a b&c=d.txt") == "query strings survive"
        assert [e.name for e in sbx.files.list("/tmp") if e.name.startswith("a b")] == ["a b&c=d.txt"]
        (tmp_path / "tree" / "sub").mkdir(parents=True)
        (tmp_path / "tree" / "sub" / "f").write_text("in a tar")
        assert sbx.files.upload_dir(tmp_path / "tree", "/tmp/tree").files == 1
        assert sbx.files.download_dir("/tmp/tree", tmp_path / "back") == 2
        assert (tmp_path / "back" / "sub" / "f").read_text() == "in a tar"
        with pytest.raises(FileNotFoundError_):
            sbx.files.read("/tmp/nothing-here")
        assert sbx.commands.run("sha256sum /tmp/big").stdout.split()[0] == hashlib.sha256(big.read_bytes()).hexdigest()
