"""The fleet end to end: a real three-node Ray cluster, a real daemon per node, the controller in front; the SDK
and the CLI used exactly as against one daemon."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import httpx
import pytest

from branchbox.sdk import Sandbox, SandboxError
from tests.conftest import cli_env
from tests.fleet.conftest import MEMORY_MB, Fleet, daemon_env, wait_for

pytestmark = [pytest.mark.root, pytest.mark.template, pytest.mark.fleet, pytest.mark.timeout(1200)]


def cli(url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "branchbox.cli", "--url", url, *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def kill_all(sandboxes: list[Sandbox]) -> None:
    for s in sandboxes:
        with contextlib.suppress(SandboxError):
            s.kill()
        s.close()


def spread_exec_files_and_cli_through_the_controller(fleet: Fleet) -> None:
    ctl = fleet.start_controller("spread")
    made = [Sandbox.create(base_url=ctl.url, memory_mb=256) for _ in range(3)]
    try:
        assert sorted(fleet.holder(s.sandbox_id) for s in made) == fleet.names  # one per node
        for s in made:
            t = s.info.timings
            assert {"fleet_allocate", "fleet_node_call", "fleet_total", "total"} <= set(t), t
            r = s.commands.run("echo $((6*7)); hostname")
            assert r.exit_code == 0 and r.stdout.splitlines()[0] == "42"
            s.files.write("/tmp/x.txt", b"through the fleet")
            assert s.files.read("/tmp/x.txt", format="bytes") == b"through the fleet"
        # a second client that knows only the id (the controller asks the nodes who holds it)
        again = Sandbox.connect(made[1].sandbox_id, base_url=ctl.url)
        try:
            assert again.commands.run("cat /tmp/x.txt").stdout == "through the fleet"
        finally:
            again.close()
        # the CLI, unchanged: list (merged from every node), exec (a WebSocket stream relayed), nodes
        listed = json.loads(cli(ctl.url, "ls", "--json").stdout)
        assert {s.sandbox_id for s in made} <= {x["sandbox_id"] for x in listed}
        out = cli(ctl.url, "exec", made[2].sandbox_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
        assert (out.returncode, out.stdout.strip(), out.stderr.strip()) == (3, "out", "err"), out
        nodes = json.loads(cli(ctl.url, "fleet", "nodes", "--json").stdout)
        assert {n["node"]: n["state"] for n in nodes} == dict.fromkeys(fleet.names, "ready")
        assert all(n["memory_mb_free"] <= MEMORY_MB - 256 for n in nodes)
        table = cli(ctl.url, "fleet", "nodes").stdout
        assert all(name in table for name in fleet.names)
        metrics = httpx.get(ctl.url + "/metrics").text
        assert 'branchbox_fleet_create_seconds_count{phase="allocate"} 3.0' in metrics
        # snapshots stay on their node: a restore is sent there, forks run beside their parent
        snap = made[1].create_snapshot()
        restored = Sandbox.create(base_url=ctl.url, snapshot=snap.snapshot_id)
        made.append(restored)
        assert fleet.holder(restored.sandbox_id) == fleet.holder(made[1].sandbox_id)
        assert restored.files.read("/tmp/x.txt") == "through the fleet"
        children = made[0].fork(count=2)
        made += [c for c in children if isinstance(c, Sandbox)]
        assert all(isinstance(c, Sandbox) for c in children), children
        assert {fleet.holder(c.sandbox_id) for c in children} == {fleet.holder(made[0].sandbox_id)}
        assert children[1].files.read("/tmp/x.txt") == "through the fleet"  # a child found by id via the nodes
    finally:
        kill_all(made)
    for s in made[:3]:
        with pytest.raises(SandboxError) as info:
            Sandbox.connect(s.sandbox_id, base_url=ctl.url)
        assert info.value.code == "sandbox_not_found"


def pack_fills_one_node_first(fleet: Fleet) -> None:
    ctl = fleet.start_controller("pack")
    made = []
    try:
        made = [Sandbox.create(base_url=ctl.url, memory_mb=256) for _ in range(3)]
        assert len({fleet.holder(s.sandbox_id) for s in made}) == 1
    finally:
        kill_all(made)
        fleet.start_controller("spread")


def drain_labels_and_no_capacity(fleet: Fleet) -> None:
    ctl = fleet.controller
    assert ctl is not None
    out = cli(ctl.url, "fleet", "drain", "n0")
    assert out.stdout.strip() == "n0: draining"
    made = []
    try:
        made = [Sandbox.create(base_url=ctl.url, memory_mb=256) for _ in range(4)]
        assert "n0" not in {fleet.holder(s.sandbox_id) for s in made}
        # labels: only slot=2 (n2) may take it
        s = Sandbox.create(base_url=ctl.url, memory_mb=256, metadata={"fleet.labels": "slot=2"})
        made.append(s)
        assert fleet.holder(s.sandbox_id) == "n2"
        # nothing fits: a clear error within the placement timeout (3 s here), not a request pending forever
        with pytest.raises(SandboxError) as info:
            Sandbox.create(base_url=ctl.url, memory_mb=MEMORY_MB * 2)
        assert info.value.code == "no_capacity" and info.value.status == 503
        assert "waited 3 s" in info.value.message and "fleet nodes" in info.value.message
        with pytest.raises(SandboxError) as info:
            Sandbox.create(base_url=ctl.url, metadata={"fleet.labels": "slot=0"})  # n0 is draining
        assert info.value.code == "no_capacity"
        with pytest.raises(SandboxError) as info:
            Sandbox.create("no-such-template", base_url=ctl.url)
        assert info.value.code == "no_capacity" and "holds template 'no-such-template'" in info.value.message
        with pytest.raises(SandboxError) as info:
            Sandbox.create(base_url=ctl.url, metadata={"fleet.labels": "oops"})
        assert info.value.code == "bad_request"
        bad = httpx.post(ctl.url + "/v1/fleet/nodes/nope/drain")
        assert (bad.status_code, bad.json()["error"]["code"]) == (404, "node_not_found")
        # pools are the fleet's (summed over its nodes: none here); what the controller does not serve is a clear
        # refusal, not a wrong answer
        pools = httpx.get(ctl.url + "/v1/pools")
        assert (pools.status_code, pools.json()) == (200, [])
        seed = httpx.post(ctl.url + "/api/v1/agent/workspaces", json={"repository_url": "https://x/y.git"})
        assert (seed.status_code, seed.json()["error"]["code"]) == (501, "not_supported")
    finally:
        kill_all(made)
        cli(ctl.url, "fleet", "drain", "n0", "--undo")
    assert ctl.nodes()["n0"]["state"] == "ready"


def node_lost_without_grace_is_avoided_then_rejoins(fleet: Fleet) -> None:
    ctl = fleet.controller
    assert ctl is not None
    victim = fleet.daemons[2]
    kept = Sandbox.create(base_url=ctl.url, memory_mb=256, metadata={"fleet.labels": "slot=2"})
    others: list[Sandbox] = []
    try:
        assert fleet.holder(kept.sandbox_id) == "n2"
        kept.files.write("/tmp/state", b"before")
        t0 = time.monotonic()
        fleet.cluster.remove_node(fleet.ray_nodes[2], allow_graceful=False)  # raylet and its workers SIGKILLed
        lost = wait_for(lambda: ctl.nodes()["n2"]["state"] == "lost" and ctl.nodes()["n2"], "n2 lost", 30)
        print(f"node loss seen after {time.monotonic() - t0:.2f} s: {lost['lost_reason']}")
        with pytest.raises(SandboxError) as info:
            kept.commands.run("true")
        assert info.value.code == "sandbox_lost" and "'n2'" in info.value.message
        others = [Sandbox.create(base_url=ctl.url, memory_mb=256) for _ in range(3)]
        assert "n2" not in {fleet.holder(s.sandbox_id) for s in others}
        # rejoin: a new Ray node on the host, the daemon restarted on it (same name, same data dir)
        new_node = fleet.cluster.add_node(num_cpus=1)
        fleet.ray_nodes[2] = new_node
        victim.stop()
        victim.extra_env.update(daemon_env(fleet.cluster.address, "n2", new_node.node_id, 2))
        victim.start()
        wait_for(lambda: ctl.nodes()["n2"]["state"] == "ready", "n2 back", 240)
        assert kept.files.read("/tmp/state", format="bytes") == b"before"  # reconciled: the same sandbox
        assert kept.commands.run("echo back").stdout.strip() == "back"
        fresh = Sandbox.create(base_url=ctl.url, memory_mb=256, metadata={"fleet.labels": "slot=2"})
        others.append(fresh)
        assert fleet.holder(fresh.sandbox_id) == "n2"
    finally:
        kill_all([kept, *others])


def test_a_fleet_end_to_end(fleet: Fleet) -> None:
    """One test, so one cluster (~0.8 GB, 3 daemons, a controller) whatever pytest-xdist does with a module:
    the scenarios run in this order (the last one kills a node)."""
    spread_exec_files_and_cli_through_the_controller(fleet)
    pack_fills_one_node_first(fleet)
    drain_labels_and_no_capacity(fleet)
    node_lost_without_grace_is_avoided_then_rejoins(fleet)
