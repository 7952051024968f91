"""Network policies, address slots and the nftables scripts (loaded into a real, uniquely named table)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets

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


def test_policy_changes_are_element_adds_and_flushes_in_a_safe_order() -> None:
    slot = AddressPool(ipaddress.IPv4Network("10.9.0.0/24")).allocate()
    default = NetworkPolicy()
    closed = NetworkPolicy.of(False, {"allow_out": ["192.0.2.0/24"], "deny_out": ["198.51.100.0/24"]})
    # a claim (from the pooled default): one transaction of adds, the deny list in the spare generation
    scripts, gen = rules.policy_change("t", slot, default, closed, deny_gen=0, pinned=False, denied=False)
    assert len(scripts) == 1
    assert gen == 1
    assert "flush" not in scripts[0]
    assert "add element inet t e0 { 198.51.100.0/24 }" in scripts[0]
    assert "add element inet t o0 { 0.0.0.0/0 }" in scripts[0]
    # a live change that replaces the allow list: flush first, add in a second transaction
    other = closed.updated({"allow_out": ["203.0.113.0/24"], "deny_out": [], "allow_internet_access": True})
    scripts, gen2 = rules.policy_change("t", slot, closed, other, deny_gen=gen, pinned=True, denied=True)
    assert len(scripts) == 2
    assert gen2 == 0
    first, second = scripts
    assert "flush set inet t a0" in first and "flush set inet t p0" in first and "flush set inet t r0" in first
    assert "add element inet t a0 { 203.0.113.0/24 }" in second
    assert "flush set inet t e0" in second and "flush set inet t o0" in second and "flush set inet t q0" in second
    # nothing changes: nothing to run
    assert rules.policy_change("t", slot, closed, closed, deny_gen=1, pinned=False, denied=False) == ([], 1)


@pytest.mark.root
def test_rule_scripts_load_update_and_unload_in_a_real_table() -> None:
    table = f"bbu{secrets.token_hex(4)}"
    prefix = f"u{secrets.token_hex(2)}-"
    nft = Nft()
    pool = AddressPool(ipaddress.IPv4Network("10.9.0.0/24"))
    try:
        nft.run(rules.table_script(table, prefix, "10.9.0.0/24", 5353))
        slot = pool.allocate()
        policy = NetworkPolicy.of(None, {"allow_out": ["192.168.1.0/24", "pypi.org"], "deny_out": ["0.0.0.0/0"]})
        nft.run(rules.add_sandbox_script(table, prefix, slot, policy))
        nft.run(rules.pin_script(table, slot, {"p": ["198.51.100.7"], "r": ["198.51.100.8"]}))
        listing = sh("nft", "list", "table", "inet", table)
        assert "192.168.1.0/24" in listing and "198.51.100.7" in listing and "0.0.0.0/0" in listing
        assert f'"{prefix}0" : jump s0' in listing
        closed = NetworkPolicy(internet=False)
        for script in rules.policy_change(table, slot, policy, closed, deny_gen=0, pinned=True, denied=False)[0]:
            nft.run(script)
        for name, want in (("a0", ""), ("d0", ""), ("p0", ""), ("r0", ""), ("o0", "0.0.0.0/0")):
            elements = sh("nft", "list", "set", "inet", table, name)
            assert (want in elements) if want else ("elements" not in elements), (name, elements)
        nft.run(rules.remove_sandbox_script(table, prefix, slot))
        assert " s0 " not in sh("nft", "list", "table", "inet", table)
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

    assert "p0 { 192.0.2.1" in pin()
    clock[0] += ttl * 0.4
    assert pin() == ""  # more than half its time left: nothing to do
    clock[0] += ttl * 0.2
    assert "r0 { 192.0.2.1" in pin()  # renewed in the other set
    clock[0] += ttl * 0.6
    assert "p0 { 192.0.2.1" in pin()  # the entry in p expired long ago: p takes the renewal
    net._pin(att, ["192.0.2.9"], allow=False)
    assert "q0 { 192.0.2.9" in scripts[-1]
    assert att.denied
