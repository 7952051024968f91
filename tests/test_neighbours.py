"""Neighbouring daemons on one host (issue 21.2): real ``branchbox serve`` processes with the names they derive
themselves (no cgroup parent or subnet given), started and stopped around each other's running sandboxes.

Before host claims, a second daemon with the default names killed the first one's sandboxes at start (its
reconcile removed every cgroup under the shared parent ``branchbox`` that it had no record of) and took their
network at stop (it deleted the shared nftables table ``inet branchbox``)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from branchbox import Sandbox
from branchbox.daemon.claims import (
    ALLOC_POOL,
    ClaimError,
    HostNames,
    Wanted,
    allocate_subnet,
    claim,
    claims_dir,
    derive,
    host_routes,
    network_names,
)
from tests.conftest import DaemonProc, new_data_dir
from tests.net_env import Internet

CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 80), timeout=2).close()"


def _policy(internet: Internet) -> dict[str, Any]:
    return {"allow_out": [internet.public_a], "deny_out": ["0.0.0.0/0"]}


def _create(d: DaemonProc, internet: Internet) -> str:
    sbx = Sandbox.create(base_url=d.url, timeout=3600, allow_internet_access=True, network=_policy(internet))
    sid = sbx.sandbox_id
    sbx.close()
    return sid


def _reaches(sbx: Sandbox, address: str) -> bool:
    return sbx.commands.run(["python3", "-c", CONNECT, address]).exit_code == 0


def _assert_serves(d: DaemonProc, sid: str, internet: Internet, marker: str) -> None:
    """The sandbox still runs its first process, reaches what its policy allows and nothing else, and resolves
    names through its daemon's DNS forwarder."""
    sbx = Sandbox.connect(sid, base_url=d.url)
    try:
        assert sbx.info.state == "running", (d.data_dir, sbx.info)
        assert sbx.files.read("/tmp/marker") == marker  # the same sandbox, not a new one
        assert sbx.commands.run("kill -0 $(cat /tmp/sleeper.pid)").exit_code == 0  # its processes live
        assert _reaches(sbx, internet.public_a), f"{sid} of {d.data_dir} lost its network"
        assert not _reaches(sbx, internet.public_b), f"{sid} of {d.data_dir} lost its egress policy"
        assert sbx.commands.run("getent hosts a.example.test").stdout.split()[0] == internet.public_a
    finally:
        sbx.close()


def _mark(d: DaemonProc, sid: str, marker: str) -> None:
    sbx = Sandbox.connect(sid, base_url=d.url)
    try:
        sbx.files.write("/tmp/marker", marker)
        sbx.commands.run("nohup sleep 100000 > /dev/null 2>&1 & echo $! > /tmp/sleeper.pid")
    finally:
        sbx.close()


def _names(d: DaemonProc) -> dict[str, str]:
    names: dict[str, str] = json.loads((d.data_dir / "host.json").read_text())
    return names


def _disjoint(daemons: list[DaemonProc]) -> None:
    seen = [_names(d) for d in daemons]
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            for key in ("cgroup_parent", "table", "if_prefix"):
                assert a[key] != b[key], (key, a, b)
            assert not ipaddress.ip_network(a["subnet"]).overlaps(ipaddress.ip_network(b["subnet"])), (a, b)


@pytest.mark.root
@pytest.mark.timeout(900)
def test_three_daemons_started_and_stopped_around_each_others_sandboxes(
    daemon_factory: Any, internet: Internet
) -> None:
    env = {"BRANCHBOX_NETWORK_DNS_UPSTREAM": internet.dns}
    a: DaemonProc = daemon_factory(derived=True, keep=True, env=env)
    sa = _create(a, internet)
    _mark(a, sa, "a")
    b: DaemonProc = daemon_factory(derived=True, keep=True, env=env)  # starts next to a's running sandbox
    sb = _create(b, internet)
    _mark(b, sb, "b")
    c: DaemonProc = daemon_factory(derived=True, keep=False, env=env)
    sc = _create(c, internet)
    _mark(c, sc, "c")
    _disjoint([a, b, c])
    assert not {"branchbox", "bbn"} & {v for d in (a, b, c) for v in _names(d).values()}  # not the legacy names
    live = {"a": (a, sa), "b": (b, sb), "c": (c, sc)}

    def check(*which: str) -> None:
        for marker in which:
            d, sid = live[marker]
            _assert_serves(d, sid, internet, marker)

    check("a", "b", "c")
    c.stop(signal.SIGTERM)  # keep=False: c destroys its own sandbox, nothing of a's or b's
    check("a", "b")
    b.stop(signal.SIGKILL)  # b's sandbox keeps running without its daemon
    c.start()  # a start next to a crashed neighbour: must not take b's orphans for its own
    live["c2"] = (c, _create(c, internet))
    _mark(c, live["c2"][1], "c2")
    check("a", "c2")
    names_b = _names(b)
    b.start()  # re-attaches its sandbox, with the names it had
    assert _names(b) == names_b
    check("a", "b", "c2")
    a.stop(signal.SIGKILL)
    b.stop(signal.SIGTERM)  # keep=True: its sandbox stays for the next start
    check("c2")
    a.start()
    b.start()
    check("a", "b", "c2")


@pytest.mark.root
def test_a_second_daemon_on_the_same_data_dir_is_refused(daemon_factory: Any) -> None:
    first: DaemonProc = daemon_factory(derived=True)
    with Sandbox.create(base_url=first.url) as sbx:
        second = DaemonProc(first.data_dir, derived=True)
        second.log_path = first.data_dir / "second.log"
        with pytest.raises(RuntimeError, match="exited with 2") as info:
            second.start()
        assert f"another daemon (pid {first.proc.pid if first.proc else '?'}) already serves the data dir" in str(
            info.value
        )
        assert sbx.commands.run("echo still").stdout == "still\n"


@pytest.mark.root
def test_colliding_settings_are_refused_naming_the_other(daemon_factory: Any) -> None:
    first: DaemonProc = daemon_factory(derived=True)
    names = _names(first)
    pid = first.proc.pid if first.proc else -1
    with Sandbox.create(base_url=first.url) as sbx:
        for env, setting in (
            ({"BRANCHBOX_CGROUP_PARENT": names["cgroup_parent"]}, "cgroup_parent"),
            # a part of its subnet: it overlaps only that daemon's (a wider one could meet another daemon of the host)
            (
                {"BRANCHBOX_NETWORK_SUBNET": str(next(ipaddress.ip_network(names["subnet"]).subnets(1)))},
                "network_subnet",
            ),
            ({"BRANCHBOX_NETWORK_TABLE": names["table"]}, "network_table"),
            ({"BRANCHBOX_NETWORK_IF_PREFIX": names["if_prefix"]}, "network_if_prefix"),
        ):
            other = DaemonProc(new_data_dir(), derived=True, env=env)
            try:
                with pytest.raises(RuntimeError, match="exited with 2") as info:
                    other.start()
                message = str(info.value)
                assert setting in message, message
                assert f"daemon of data dir {first.data_dir} (running, pid {pid})" in message, message
                assert not (other.data_dir / "host.json").exists()  # refused: it claimed nothing
            finally:
                shutil.rmtree(other.data_dir, ignore_errors=True)
        assert sbx.commands.run("echo still").stdout == "still\n"


@pytest.mark.root
def test_names_of_a_crashed_daemon_stay_reserved_while_its_data_dir_exists(daemon_factory: Any) -> None:
    first: DaemonProc = daemon_factory(derived=True, keep=True)
    names = _names(first)
    first.stop(signal.SIGKILL)
    other = DaemonProc(new_data_dir(), derived=True, env={"BRANCHBOX_CGROUP_PARENT": names["cgroup_parent"]})
    try:
        with pytest.raises(RuntimeError, match="exited with 2") as info:
            other.start()
        assert f"daemon of data dir {first.data_dir} (not running" in str(info.value)
    finally:
        shutil.rmtree(other.data_dir, ignore_errors=True)
    registry = json.loads((claims_dir() / "claims.json").read_text())
    assert registry[os.path.realpath(first.data_dir)]["names"] == names
    first.start()
    assert _names(first) == names


@pytest.mark.root
def test_make_test_next_to_make_run(daemon_factory: Any, internet: Internet) -> None:
    """A user's daemon with the default configuration on its own data dir (keep_sandboxes_on_shutdown, as `make
    run`) serves a sandbox while daemons of the suite start, make and destroy sandboxes, and stop (SIGTERM and
    SIGKILL), as `make test` does next to `make run`."""
    env = {"BRANCHBOX_NETWORK_DNS_UPSTREAM": internet.dns}
    user: DaemonProc = daemon_factory(derived=True, keep=True, env=env)
    sid = _create(user, internet)
    _mark(user, sid, "user")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        suite = [daemon_factory(env=env), daemon_factory(derived=True, env=env)]  # the suite's two kinds
        for d in suite:
            with Sandbox.create(base_url=d.url, allow_internet_access=True, network=_policy(internet)) as sbx:
                assert _reaches(sbx, internet.public_a)
            Sandbox.create(base_url=d.url).close()  # left running: the daemon's stop deals with it
        _assert_serves(user, sid, internet, "user")
        for d in suite:
            d.stop(sig)
        _assert_serves(user, sid, internet, "user")


# ------------------------------------------------------------------ the pure parts


def test_derived_names_are_stable_distinct_and_legacy_for_the_default_data_dir(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert derive(one) == derive(one) != derive(two)
    assert derive(one).startswith("branchbox-") and derive(one, salt=1) != derive(one)
    (tmp_path / "link").symlink_to(one)
    assert derive(tmp_path / "link") == derive(one)  # by real path
    assert derive(Path("/var/lib/branchbox")) == "branchbox"
    assert network_names("branchbox") == ("branchbox", "bbn")
    table, prefix = network_names(derive(one))
    assert table != "branchbox" and len(prefix) == 6 and not prefix.startswith("bbn")


def test_clashes_name_each_setting() -> None:
    a = HostNames("p1", "t1", "x1", "10.224.0.0/18")
    assert a.clashes(HostNames("p2", "t2", "x2", "10.224.64.0/18")) == []
    assert HostNames("p1-vm").clashes(a) == ["cgroup_parent (p1-vm; a daemon's microVMs use p1-vm-vm)"]
    assert a.clashes(HostNames("p1", "t1", "x1", "10.224.32.0/20")) == [
        "cgroup_parent (p1; a daemon's microVMs use p1-vm)",
        "network_table (t1)",
        "network_if_prefix (x1)",
        "network_subnet (10.224.0.0/18 overlaps 10.224.32.0/20)",
    ]
    assert HostNames("p1").clashes(HostNames("p2", "t1", "x1", "10.224.0.0/18")) == []  # no network: no net claim


def test_allocated_subnets_avoid_claims_and_host_routes(tmp_path: Path) -> None:
    first = allocate_subnet([], [], tmp_path)
    assert ipaddress.ip_network(first).subnet_of(ALLOC_POOL)  # type: ignore[arg-type]
    assert allocate_subnet([], [], tmp_path) == first  # the same data dir tends to get the same block
    routed = [ipaddress.IPv4Network(first).supernet(1)]
    second = allocate_subnet([], routed, tmp_path)
    assert not ipaddress.ip_network(second).overlaps(routed[0])
    third = allocate_subnet([first, second], [], tmp_path)
    assert third not in (first, second)
    with pytest.raises(ClaimError, match="configure network_subnet"):
        allocate_subnet([str(ALLOC_POOL)], [], tmp_path)
    assert all(r.prefixlen > 0 for r in host_routes())


def test_claims_in_a_private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's rules without daemons: same data dir refused while held, names kept across restarts, a
    derived name that another daemon holds is derived again, a configured one is refused naming the other."""
    monkeypatch.setenv("BRANCHBOX_CLAIMS_DIR", str(tmp_path / "claims"))
    one, two = tmp_path / "one", tmp_path / "two"
    first = claim(one, Wanted(network=True))
    try:
        with pytest.raises(ClaimError, match=f"another daemon \\(pid {os.getpid()}\\) already serves"):
            claim(one, Wanted(network=True))
    finally:
        first.release()
    again = claim(one, Wanted(network=True))  # released (as by a crash): the same names again
    again.release()
    assert again.names == first.names
    # another data dir whose derived names someone else holds gets salted names
    registry = tmp_path / "claims" / "claims.json"
    doc = json.loads(registry.read_text())
    squatter = tmp_path / "squatter"
    squatter.mkdir()
    doc[str(squatter)] = {"pid": 1, "names": {"cgroup_parent": derive(two), "table": None, "if_prefix": None,
                                               "subnet": None}}  # fmt: skip
    registry.write_text(json.dumps(doc))
    second = claim(two, Wanted(network=True))
    second.release()
    assert second.names.cgroup_parent == derive(two, salt=1)
    assert not second.names.clashes(first.names)
    with pytest.raises(ClaimError, match=f"data dir {squatter} \\(not running.*BRANCHBOX_CGROUP_PARENT"):
        claim(tmp_path / "three", Wanted(network=False, cgroup_parent=derive(two)))
    squatter.rmdir()  # a deleted data dir frees its names
    claim(tmp_path / "three", Wanted(network=False, cgroup_parent=derive(two))).release()


def test_a_registry_entry_with_fields_of_a_newer_daemon_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer daemon's entry (a name this version does not know) neither stops an older daemon nor is lost by it."""
    monkeypatch.setenv("BRANCHBOX_CLAIMS_DIR", str(tmp_path / "claims"))
    newer = tmp_path / "newer"
    newer.mkdir()
    names = {"cgroup_parent": derive(tmp_path / "mine"), "table": None, "if_prefix": None, "subnet": None}
    entry = {"pid": 1, "names": {**names, "a_future_name": 1 << 20}}
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "claims.json").write_text(json.dumps({str(newer): entry}))
    mine = claim(tmp_path / "mine", Wanted(network=False))
    mine.release()
    assert mine.names.cgroup_parent == derive(tmp_path / "mine", salt=1)  # its names are still taken
    assert json.loads((tmp_path / "claims" / "claims.json").read_text())[str(newer)] == entry


@pytest.mark.root
def test_orphan_veths_are_matched_by_the_whole_prefix() -> None:
    """``bbq`` owns ``bbq-<slot>`` only: a neighbour's ``bbqx-1`` is not its orphan."""
    import asyncio
    import subprocess

    from branchbox.net.service import Network
    from branchbox.net.settings import NetworkSettings

    mine, theirs = "bbq-7f1", "bbqx-7f1"
    for name, peer in ((mine, "nqa7f1"), (theirs, "nqb7f1")):  # no dummy module here: veth pairs
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        net = Network(NetworkSettings(subnet="10.251.0.0/24", table="neigh_unused", if_prefix="bbq"))
        assert net.interfaces() == [mine]
        assert asyncio.run(net.remove_orphans()) == [mine]
        assert os.path.exists(f"/sys/class/net/{theirs}")
    finally:
        for name in (mine, theirs):
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
