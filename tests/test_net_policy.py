"""Network policies, address slots and the nftables scripts (loaded into a real, uniquely named table)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from pathlib import Path

import pytest

from branchbox.errors import LimitExceededError, NetworkError, NetworkPolicyError
from branchbox.net import rules
from branchbox.net.addresses import AddressPool
from branchbox.net.nftables import Nft
from branchbox.net.policy import NetworkPolicy, Rules
from branchbox.net.settings import NetworkSettings
from tests.net_env import sh


def test_default_policy_is_internet_without_private_ranges() -> None:
    p = NetworkPolicy.of()
    assert p.internet is True
    assert p.allow_out == Rules() and p.deny_out == Rules()
    assert NetworkPolicy.of(False).internet is False
    assert NetworkPolicy.of(None, {"allow_internet_access": False}).internet is False


def test_entries_split_into_cidrs_and_domains() -> None:
    p = NetworkPolicy.of(
        None, {"allow_out": ["203.0.113.0/24", "1.2.3.4", "PyPI.org.", "*.Example.com", "1.2.3.4"], "deny_out": []}
    )
    assert p.allow_out.cidrs == ("203.0.113.0/24", "1.2.3.4/32")
    assert p.allow_out.domains == ("pypi.org", "*.example.com")
    assert p.allow_out.matches_domain("pypi.org.")
    assert not p.allow_out.matches_domain("files.pypi.org")
    assert p.allow_out.matches_domain("a.b.example.com")
    assert not p.allow_out.matches_domain("example.com")
    assert NetworkPolicy.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["allow_out"] == ["203.0.113.0/24", "1.2.3.4/32", "pypi.org", "*.example.com"]


@pytest.mark.parametrize(
    "patch",
    [
        {"allow_out": ["exa mple.com"]},
        {"allow_out": ["-bad.com"]},
        {"allow_out": ["localhost"]},  # a single label is not a domain on the internet
        {"allow_out": ["1.2.3.4.5"]},
        {"deny_out": ["::1"]},
        {"deny_out": ["fc00::/7"]},
        {"allow_out": "pypi.org"},
        {"allow_out": [7]},
        {"allow_out": [""]},
        {"allow_out": ["x" * 300 + ".com"]},
        {"allow_internet_access": "yes"},
        {"egress": ["1.2.3.4"]},
    ],
)
def test_invalid_entries_are_rejected_with_a_stable_code(patch: dict[str, object]) -> None:
    with pytest.raises(NetworkPolicyError) as exc:
        NetworkPolicy().updated(patch)
    assert exc.value.code == "invalid_network_policy"
    assert exc.value.http_status == 400


def test_update_replaces_only_the_given_keys() -> None:
    p = NetworkPolicy.of(None, {"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]})
    q = p.updated({"deny_out": []})
    assert q.allow_out == p.allow_out and q.deny_out == Rules() and q.internet
    assert p.updated({"allow_internet_access": False}).allow_out == p.allow_out
    assert not p.uses_dns or p.internet
    assert NetworkPolicy(internet=False).uses_dns is False
    assert NetworkPolicy(internet=False, allow_out=Rules(domains=("pypi.org",))).uses_dns is True


def test_address_slots_round_robin_and_exhaustion() -> None:
    pool = AddressPool(ipaddress.IPv4Network("10.9.0.0/28"))  # 4 slots
    slots = [pool.allocate() for _ in range(4)]
    assert [str(s.sandbox) for s in slots] == ["10.9.0.2", "10.9.0.6", "10.9.0.10", "10.9.0.14"]
    assert str(slots[1].host) == "10.9.0.5"
    with pytest.raises(LimitExceededError):
        pool.allocate()
    pool.release(1)
    pool.release(0)
    assert pool.allocate().index == 0  # the next free after the last given (3) wraps to 0
    assert pool.allocate().index == 1
    assert pool.index_of("10.9.0.6") == 1
    assert pool.index_of("10.9.0.5") is None
    assert pool.index_of("192.0.2.1") is None


def test_settings_are_validated() -> None:
    for bad in ({"subnet": "10.0.0.0/30"}, {"subnet": "fd00::/64"}, {"table": "Bad-Name"}, {"if_prefix": "x"}):
        with pytest.raises(ValueError):
            NetworkSettings(**bad)  # type: ignore[arg-type]
    assert NetworkSettings(dns_upstream="192.0.2.53:5353").upstream() == ("192.0.2.53", 5353)
    assert NetworkSettings(dns_upstream="192.0.2.53").upstream() == ("192.0.2.53", 53)


def test_a_claim_only_adds_elements_and_a_live_change_is_one_transaction() -> None:
    default = NetworkPolicy()
    closed = NetworkPolicy.of(False, {"allow_out": ["192.0.2.0/24"], "deny_out": ["198.51.100.0/24"]})
    no_pins: dict[str, list[str]] = {"pins": [], "pins2": [], "dpins": []}
    claim = rules.policy_change("t", "10.9.0.2", default, closed, no_pins)
    assert "delete" not in claim  # from the pooled default: adds only (no cache of elements to load)
    assert "add element inet t allow { 10.9.0.2 . 192.0.2.0/24 }" in claim
    assert "add element inet t deny { 10.9.0.2 . 198.51.100.0/24 }" in claim
    assert "add element inet t offline { 10.9.0.2 }" in claim
    other = closed.updated({"allow_out": ["203.0.113.0/24"], "deny_out": [], "allow_internet_access": True})
    live = rules.policy_change("t", "10.9.0.2", closed, other, {"pins": ["1.1.1.1"], "pins2": [], "dpins": []})
    assert "delete element inet t allow { 10.9.0.2 . 192.0.2.0/24 }" in live
    assert "add element inet t allow { 10.9.0.2 . 203.0.113.0/24 }" in live
    assert "delete element inet t deny { 10.9.0.2 . 198.51.100.0/24 }" in live
    assert "delete element inet t offline { 10.9.0.2 }" in live
    # pins may have expired: added (a no-op when present) before they are deleted
    assert live.index("add element inet t pins { 10.9.0.2 . 1.1.1.1 }") < live.index(
        "delete element inet t pins { 10.9.0.2 . 1.1.1.1 }"
    )
    assert rules.policy_change("t", "10.9.0.2", closed, closed, no_pins) == ""


@pytest.mark.root
def test_rule_scripts_load_update_and_unload_in_a_real_table() -> None:
    table = f"bbu{secrets.token_hex(4)}"
    prefix = f"u{secrets.token_hex(2)}-"
    nft = Nft()
    try:
        nft.run(rules.table_script(table, prefix, "10.9.0.0/24", 5353))
        addr, host_if = "10.9.0.2", f"{prefix}0"
        policy = NetworkPolicy.of(None, {"allow_out": ["192.168.1.0/24", "pypi.org"], "deny_out": ["0.0.0.0/0"]})
        nft.run(rules.add_sandbox_script(table, host_if, addr, policy))
        nft.run(rules.pin_script(table, addr, {"pins": ["198.51.100.7"], "pins2": ["198.51.100.8"], "dpins": []}))
        listing = sh("nft", "list", "table", "inet", table)
        assert "10.9.0.2 . 192.168.1.0/24" in listing and "10.9.0.2 . 198.51.100.7" in listing
        assert f'"{host_if}" . 10.9.0.2' in listing
        pins = {"pins": ["198.51.100.7", "198.51.100.9"], "pins2": ["198.51.100.8"], "dpins": []}  # .9 expired
        closed = NetworkPolicy(internet=False)
        nft.run(rules.policy_change(table, addr, policy, closed, pins))
        for name, want in (("allow", ""), ("deny", ""), ("pins", ""), ("pins2", ""), ("offline", addr)):
            elements = sh("nft", "list", "set", "inet", table, name)
            assert (want in elements) if want else ("elements" not in elements), (name, elements)
        nft.run(rules.remove_sandbox_script(table, host_if, addr, closed, {"pins": [], "pins2": [], "dpins": []}))
        for name in ("owned", "offline"):
            assert "elements" not in sh("nft", "list", "set", "inet", table, name)
        with pytest.raises(NetworkError) as exc:
            nft.run("add rule inet nosuchtable nochain drop")
        assert exc.value.code == "network_error"
    finally:
        nft.run(rules.delete_table_script(table))
        nft.close()
    assert table not in sh("nft", "list", "tables")


@pytest.mark.root
async def test_veth_wiring_by_netlink_and_its_failure_leaves_nothing() -> None:
    import subprocess

    from branchbox.net import links

    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
    name = f"w{secrets.token_hex(3)}-0"
    pool = AddressPool(ipaddress.IPv4Network("10.9.4.0/30"))
    slot = pool.allocate()
    try:
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            os.sched_yield()  # until unshare has made the namespace
        await links.create_veth(name, slot, holder.pid)
        inside = sh("nsenter", f"--net=/proc/{holder.pid}/ns/net", "ip", "-4", "-o", "addr", "show", "eth0")
        assert "10.9.4.2/30" in inside
        route = sh("nsenter", f"--net=/proc/{holder.pid}/ns/net", "ip", "route", "show", "default")
        assert "via 10.9.4.1 dev eth0" in route
        assert "10.9.4.1/30" in sh("ip", "-4", "-o", "addr", "show", name)
        assert sh("ip", "-6", "-o", "addr", "show", name).strip() == ""  # no IPv6 on the host end
        assert Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").read_text().strip() == "1"
        with pytest.raises(NetworkError):  # the name exists: nothing else is touched
            await links.create_veth(name, slot, holder.pid)
        assert links.veth_exists(name)
        await links.delete_veth(name)
        assert not links.veth_exists(name)
        other = name[:-1] + "1"
        sh(
            "nsenter",
            f"--net=/proc/{holder.pid}/ns/net",
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth9",
        )
        with pytest.raises(NetworkError):  # eth0 exists in the namespace: the new host end is removed again
            await links.create_veth(other, slot, holder.pid)
        assert not links.veth_exists(other)
    finally:
        holder.kill()
        holder.wait()
        sh("ip", "link", "del", name, check=False)


def test_pins_are_renewed_through_the_other_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from branchbox.net import service
    from branchbox.net.service import Attachment, Network

    net = Network(NetworkSettings(subnet="10.9.0.0/24", table="bbpin", if_prefix="pin", dns_upstream="127.0.0.1"))
    scripts: list[str] = []
    monkeypatch.setattr(net, "_run", scripts.append)
    clock = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    att = Attachment("sbx", net.addresses.allocate(), "pin-0", NetworkPolicy())
    net._by_id["sbx"] = att
    ttl = rules.PIN_TIMEOUT_S

    def pin() -> str:
        scripts.clear()
        net._pin(att, ["192.0.2.1"], allow=True)
        return "".join(scripts)

    assert "pins { 10.9.0.2 . 192.0.2.1" in pin()
    clock[0] += ttl * 0.4
    assert pin() == ""  # more than half its time left: nothing to do
    clock[0] += ttl * 0.2
    assert "pins2 { 10.9.0.2 . 192.0.2.1" in pin()  # renewed in the other set
    clock[0] += ttl * 0.6
    assert "pins { 10.9.0.2 . 192.0.2.1" in pin()  # the entry in pins expired long ago: it takes the renewal
    net._pin(att, ["192.0.2.9"], allow=False)
    assert "dpins { 10.9.0.2 . 192.0.2.9" in scripts[-1]
    assert att.denied == {"192.0.2.9"}


@pytest.mark.root
async def test_attach_refuses_the_daemons_own_namespace() -> None:
    from branchbox.net.service import Network

    net = Network(NetworkSettings(subnet="10.9.8.0/24", table="bbself", if_prefix="self", dns_upstream="127.0.0.1"))
    with pytest.raises(NetworkError, match="shares the daemon's network namespace"):
        await net.attach("sbx", os.getpid(), NetworkPolicy())
    assert net.addresses.in_use == 0
    assert not os.path.exists("/sys/class/net/self-0")


@pytest.mark.root
def test_removal_works_when_some_elements_are_already_gone() -> None:
    table = f"bbr{secrets.token_hex(4)}"
    nft = Nft()
    try:
        nft.run(rules.table_script(table, "rr-", "10.9.0.0/24", 5353))
        policy = NetworkPolicy.of(False, {"allow_out": ["192.0.2.0/24"], "deny_out": ["198.51.100.0/24"]})
        nft.run(rules.add_sandbox_script(table, "rr-0", "10.9.0.2", policy))
        nft.run(f"delete element inet {table} allow {{ 10.9.0.2 . 192.0.2.0/24 }}")  # gone behind our back
        pins = {"pins": ["203.0.113.1"], "pins2": [], "dpins": ["203.0.113.2"]}  # expired long ago
        nft.run(rules.remove_sandbox_script(table, "rr-0", "10.9.0.2", policy, pins))
        doc = sh("nft", "list", "table", "inet", table)
        assert "10.9.0.2" not in doc
    finally:
        nft.run(rules.delete_table_script(table))
        nft.close()
