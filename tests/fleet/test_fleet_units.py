"""Pure pieces of the fleet: a node's capacity from its daemon's answers, the controller's handling of pushes
(join, stale, leave, rejoin) and of placement timeouts, label parsing. No Ray."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from branchbox.daemon.config import ConfigError, load_config
from branchbox.errors import BadRequestError, NoCapacityError, SandboxLostError
from branchbox.fleet.controller import Controller, ControllerSettings
from branchbox.fleet.node import JoinSettings, capacity_of, parse_labels
from branchbox.fleet.registry import Request


def test_capacity_counts_live_sandboxes_and_ready_members() -> None:
    cap = capacity_of(
        [{"name": "default"}, {"name": "py"}],
        [{"template": "default", "backend": "container", "ready": 2}, {"template": "py", "backend": "container",
                                                                       "ready": 0}],
        [{"state": "running", "memory_mb": 512, "cpu": 1.0}, {"state": "paused", "memory_mb": 256, "cpu": 0.5},
         {"state": "error", "memory_mb": 9999, "cpu": 9}],
        memory_mb=1024,
        cpu_millis=2000,
        backends=["container", "microvm"],
    )  # fmt: skip
    assert cap["memory_mb"] == 256 and cap["cpu_millis"] == 500 and cap["running"] == 2
    assert cap["warm"] == [["default", "container", 2]]
    assert ["py", "microvm"] in cap["templates"] and len(cap["templates"]) == 4
    over = capacity_of([], [], [{"state": "running", "memory_mb": 4096, "cpu": 8}], memory_mb=1024, cpu_millis=1,
                       backends=["container"])  # fmt: skip
    assert over["memory_mb"] == 0 and over["cpu_millis"] == 0  # never negative


def test_labels_and_join_settings_from_env() -> None:
    assert parse_labels("region=eu, kvm=1,") == {"region": "eu", "kvm": "1"}
    assert parse_labels(["a=b=c"]) == {"a": "b=c"}
    with pytest.raises(BadRequestError, match="KEY=VALUE"):
        parse_labels("region")
    env = {"BRANCHBOX_FLEET_ADDRESS": "h:1", "BRANCHBOX_FLEET_LABELS": "r=eu", "BRANCHBOX_FLEET_MEMORY_MB": "64"}
    s = JoinSettings.from_env(None, env, name="n1")
    assert (s.address, s.name, dict(s.labels), s.memory_mb) == ("h:1", "n1", {"r": "eu"}, 64)
    assert JoinSettings.from_env("flag:2", env).address == "flag:2"  # the flag wins


def test_the_config_files_fleet_table_under_env_and_flags(tmp_path: Path) -> None:
    """``[fleet]`` in the daemon's config file: read by load_config, checked by JoinSettings, below the
    environment and the flags (the Ray test joins one of its three daemons this way)."""
    conf = tmp_path / "config.toml"
    conf.write_text(
        "port = 7123\n[fleet]\naddress = 'head:6379'\nname = 'a'\nlabels = {region = 'eu', kvm = '1'}\n"
        "memory_mb = 2048\ncpu = 3.5\nbackends = ['container', 'microvm']\nurl = 'http://a:7123'\n"
    )
    cfg = load_config(conf, env={})
    s = JoinSettings.from_env(None, {}, table=cfg.fleet)
    assert (s.address, s.name, dict(s.labels), s.memory_mb, s.cpu) == ("head:6379", "a", {"region": "eu", "kvm": "1"},
                                                                        2048, 3.5)  # fmt: skip
    assert (s.backends, s.url) == (("container", "microvm"), "http://a:7123")
    env = {"BRANCHBOX_FLEET_MEMORY_MB": "64", "BRANCHBOX_FLEET_LABELS": "region=us"}
    s = JoinSettings.from_env("flag:1", env, table=cfg.fleet, name="from-flag")
    assert (s.address, s.name, dict(s.labels), s.memory_mb) == ("flag:1", "from-flag", {"region": "us"}, 64)
    assert JoinSettings.from_env(None, {}, table={}).address == ""  # no table, no env, no flag: no fleet
    bad = [
        ({"adress": "h:1"}, "unknown setting\\(s\\) adress in the config file's \\[fleet\\] table; known: address"),
        ({"memory_mb": "lots"}, r"invalid fleet setting memory_mb='lots' from \[fleet\] memory_mb"),
        ({"memory_mb": -1}, "must be >= 0"),
        ({"cpu": True}, "expected a number"),
        ({"interval": 0}, "must be positive"),
        ({"labels": "region"}, "KEY=VALUE"),
    ]
    for table, match in bad:
        with pytest.raises(BadRequestError, match=match):
            JoinSettings.from_env(None, {}, table=table)
    with pytest.raises(BadRequestError, match=r"BRANCHBOX_FLEET_CPU"):
        JoinSettings.from_env(None, {"BRANCHBOX_FLEET_CPU": "x"})
    conf.write_text("fleet = 'head:6379'\n")
    with pytest.raises(ConfigError, match=r"must be a table: \[fleet\]"):
        load_config(conf, env={})


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def push(node: str, seq: int, inc: str = "a", mem: int = 1024, **extra: object) -> dict[str, object]:
    cap = {"memory_mb": mem, "cpu_millis": 4000, "running": 0, "templates": [["default", "container"]], "warm": []}
    return {"node": node, "url": f"http://{node}", "labels": {}, "ray_node_id": "r-" + node, "incarnation": inc,
            "seq": seq, "capacity": cap, **extra}  # fmt: skip


def test_pushes_join_update_leave_and_rejoin() -> None:
    clock = Clock()
    c = Controller(ControllerSettings(address="x"), clock=clock)
    c.apply(push("n0", 1))
    assert c.node_url("n0") == "http://n0"
    c.apply(push("n0", 2, mem=0))
    assert c.registry.get("n0").memory_mb == 0
    c.apply(push("n0", 1, mem=4096))  # older than the last one: ignored
    assert c.registry.get("n0").memory_mb == 0
    c.apply(push("n0", 3, leave=True))
    with pytest.raises(SandboxLostError, match="left the fleet"):
        c.node_url("n0")
    c.apply(push("n0", 1, inc="b"))  # a new incarnation: a rejoin, its sequence starts again
    assert c.node_url("n0") == "http://n0" and c.registry.get("n0").seq == 1
    c.apply(push("n0", 9, inc="a", leave=True))  # a leave from the old incarnation changes nothing
    assert c.node_url("n0") == "http://n0"


async def test_a_placement_waits_for_room_then_fails_with_its_reason() -> None:
    c = Controller(ControllerSettings(address="x", placement_timeout=0.2))  # the real monotonic clock
    c.apply(push("n0", 1, mem=100))
    req = Request("default", "container", 512, 1000)

    async def room_later() -> None:
        await asyncio.sleep(0.05)
        c.apply(push("n0", 2, mem=1024))

    task = asyncio.create_task(room_later())
    got = await c.place(req, 5.0)
    await task
    assert got.node_id == "n0"
    with pytest.raises(NoCapacityError, match=r"full, draining or unreachable .*; waited 0\.05 s for room"):
        await c.place(Request("default", "container", 4096, 1000), 0.05)
