"""Sandbox networking with real namespaces, veths, nftables and the tests' own "internet" (tests/net_env.py):
defaults, allow/deny lists with CIDRs and domains, the host and private ranges blocked, DNS, live changes,
warm pools, many sandboxes at once, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from branchbox.agentclient.client import OutputChunk
from branchbox.core.manager import Manager
from branchbox.core.pool import PoolConfig
from branchbox.errors import NetworkPolicyError, NotSupportedError, TimeoutError_
from branchbox.models import TemplateInfo
from branchbox.net.settings import NetworkSettings
from tests.conftest import make_settings
from tests.net_env import Internet, host_network_state, network_settings, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

# Runs inside a sandbox: connect to each (host, port) and resolve each name; prints JSON results.
PROBE = r"""
import json, socket, sys
args = json.loads(sys.argv[1])
out = {}
for name in args.get("resolve", []):
    try:
        out[name] = socket.gethostbyname(name)
    except OSError as exc:
        out[name] = "error: " + type(exc).__name__
for host, port in args.get("connect", []):
    key = f"{host}:{port}"
    try:
        socket.create_connection((socket.gethostbyname(host), port), timeout=args.get("timeout", 1.5)).close()
        out[key] = "ok"
    except TimeoutError:
        out[key] = "timeout"
    except ConnectionRefusedError:
        out[key] = "refused"
    except OSError as exc:
        out[key] = "error: " + type(exc).__name__
print(json.dumps(out))
"""

EMPTY: dict[str, list[str]] = {"ifaces": [], "tables": [], "routes": [], "addrs": []}


async def probe(
    m: Manager,
    sid: str,
    *,
    connect: list[tuple[str, int]] = (),
    resolve: list[str] = (),
    timeout: float = 1.5,  # type: ignore[assignment]
) -> dict[str, str]:
    args = json.dumps({"connect": list(connect), "resolve": list(resolve), "timeout": timeout})
    res = await m.exec(sid, ["python3", "-c", PROBE, args], timeout=120)
    assert res.exit_code == 0, res.stderr_text
    out: dict[str, str] = json.loads(res.stdout_text)
    return out


@pytest.fixture
def net_settings(internet: Internet) -> NetworkSettings:
    return network_settings(internet)


@pytest.fixture
async def net_manager(
    default_template: TemplateInfo, data_dir: Path, net_settings: NetworkSettings
) -> AsyncIterator[Manager]:
    async with Manager.open(make_settings(data_dir, network=net_settings)) as m:
        yield m
    assert host_network_state(net_settings) == EMPTY, "the network of a closed Manager is left on the host"


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP server on every address of the host (what a sandbox must never reach)."""
    srv = socket.create_server(("0.0.0.0", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except TimeoutError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()


async def test_default_reaches_the_internet_but_not_private_ranges_or_the_host(
    net_manager: Manager, internet: Internet, host_listener: int
) -> None:
    m = net_manager
    info = await m.create()
    att = await m.get_network(info.id)
    gateway = str(att.slot.host)
    out = await probe(
        m,
        info.id,
        resolve=["a.example.test"],
        connect=[
            ("a.example.test", 80),  # a public address, by name: DNS through the host's forwarder
            (internet.public_b, 80),  # a public address, by IP
            (internet.private, 80),  # a private range (172.16/12) routed from the host
            (gateway, host_listener),  # the host, on the sandbox's own gateway address
            (internet.link_host, host_listener),  # the host, on another of its addresses
            ("127.0.0.1", 80),  # the sandbox's own loopback: nothing listens, but it is not the host's
            ("169.254.169.254", 80),  # cloud metadata
        ],
    )
    assert out["a.example.test"] == internet.public_a
    assert out["a.example.test:80"] == "ok"
    assert out[f"{internet.public_b}:80"] == "ok"
    assert out[f"{internet.private}:80"] == "timeout"
    assert out[f"{gateway}:{host_listener}"] == "timeout"
    assert out[f"{internet.link_host}:{host_listener}"] == "timeout"
    assert out["127.0.0.1:80"] == "refused"
    assert out["169.254.169.254:80"] in ("timeout", "error: OSError")
    # the host itself reaches the same listener (the block is the sandbox's, not a dead server)
    socket.create_connection((gateway, host_listener), timeout=5).close()


SPOOF = r"""
import socket, struct, sys
dst, fake = sys.argv[1], sys.argv[2]
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"legit", (dst, 9999))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # CAP_NET_RAW, as in Docker
payload = b"spoofed"
udp = struct.pack("!HHHH", 40000, 9999, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(fake),
                 socket.inet_aton(dst))
raw.sendto(ip + udp, (dst, 0))
print("sent")
"""


async def test_spoofed_source_addresses_are_dropped(net_manager: Manager, internet: Internet) -> None:
    m = net_manager
    a, b = await m.create(), await m.create()
    other = (await m.get_network(b.id)).address  # pretending to be another sandbox
    for fake in (other, "203.0.113.250"):
        res = await m.exec(a.id, ["python3", "-c", SPOOF, internet.public_a, fake])
        assert res.exit_code == 0, res.stderr_text
    # the legit datagrams tell when the spoofed ones (sent after them) would have arrived
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        seen = await asyncio.to_thread(_udp_seen, internet)
        if seen.count("legit") == 2:
            break
        assert asyncio.get_running_loop().time() < deadline, seen
        await asyncio.sleep(0.05)
    assert "spoofed" not in seen


def _udp_seen(internet: Internet) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(f"http://{internet.public_a}/udp", timeout=10) as resp:
        return resp.read().decode().splitlines()


DNS_QUERY = r"""
import socket, struct, sys
query = bytes.fromhex(sys.argv[1])
out = []
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(query, ("192.0.2.53", 53))  # a server that does not exist: the host answers anyway
out.append(u.recv(4096).hex())
t = socket.create_connection(("198.51.100.253", 53), timeout=5)  # TCP, another made-up server
t.sendall(struct.pack("!H", len(query)) + query)
size = struct.unpack("!H", t.recv(2))[0]
data = b""
while len(data) < size:
    data += t.recv(size - len(data))
out.append(data.hex())
print(" ".join(out))
"""


async def test_dns_to_any_server_over_udp_and_tcp_is_answered_by_the_host(
    net_manager: Manager, internet: Internet
) -> None:
    from dnslib import QTYPE, DNSRecord

    m = net_manager
    info = await m.create(network={"allow_out": ["a.example.test"], "deny_out": ["0.0.0.0/0"]})
    query = DNSRecord.question("a.example.test", "A").pack().hex()
    res = await m.exec(info.id, ["python3", "-c", DNS_QUERY, query])
    assert res.exit_code == 0, res.stderr_text
    for answer in res.stdout_text.split():
        rrs = DNSRecord.parse(bytes.fromhex(answer)).rr
        assert [str(r.rdata) for r in rrs if r.rtype == QTYPE.A] == [internet.public_a]
    out = await probe(m, info.id, connect=[(internet.public_a, 80)])
    assert out == {f"{internet.public_a}:80": "ok"}  # pinned by those answers


async def test_sandboxes_never_reach_each_other(net_manager: Manager) -> None:
    m = net_manager
    server = await m.create()
    address = (await m.get_network(server.id)).address
    await m.spawn(server.id, ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"])
    deadline = asyncio.get_running_loop().time() + 60
    while (await probe(m, server.id, connect=[("127.0.0.1", 8080)]))["127.0.0.1:8080"] != "ok":
        assert asyncio.get_running_loop().time() < deadline  # readiness of the server inside the sandbox
        await asyncio.sleep(0.05)
    socket.create_connection((address, 8080), timeout=5).close()  # the host reaches it (the port proxy's way)
    plain = await m.create()
    opened = await m.create(network={"allow_out": [f"{address}/32"]})  # even explicitly allowed: no way in
    for sid in (plain.id, opened.id):
        out = await probe(m, sid, connect=[(address, 8080)], timeout=1.0)
        assert out == {f"{address}:8080": "timeout"}


async def test_no_internet_access_means_no_egress_and_no_dns(net_manager: Manager, internet: Internet) -> None:
    m = net_manager
    info = await m.create(allow_internet_access=False)
    out = await probe(m, info.id, resolve=["a.example.test"], connect=[(internet.public_a, 80)], timeout=1.0)
    assert out["a.example.test"].startswith("error")
    assert out[f"{internet.public_a}:80"] == "timeout"
    assert (await m.get_network(info.id)).policy.internet is False


async def test_allow_list_of_domains_is_resolved_and_pinned_on_the_host(
    net_manager: Manager, internet: Internet
) -> None:
    m = net_manager
    info = await m.create(
        network={"allow_out": ["a.example.test", f"{internet.private}/32"], "deny_out": ["0.0.0.0/0"]}
    )
    before = await probe(m, info.id, connect=[(internet.public_a, 80)], timeout=1.0)
    assert before[f"{internet.public_a}:80"] == "timeout", "not resolved yet: its address is not pinned"
    out = await probe(
        m,
        info.id,
        resolve=["a.example.test", "b.example.test"],
        connect=[("a.example.test", 80), (internet.public_b, 80), (internet.private, 80)],
        timeout=1.0,
    )
    assert out["a.example.test"] == internet.public_a
    assert out["a.example.test:80"] == "ok"  # pinned by the host's forwarder before it answered
    assert out["b.example.test"] == internet.public_b  # answers are harmless...
    assert out[f"{internet.public_b}:80"] == "timeout"  # ...connections are what the policy checks
    assert out[f"{internet.private}:80"] == "ok"  # a private range, explicitly allowed


async def test_an_allowed_name_answered_with_a_blocked_address_opens_nothing(
    net_manager: Manager, internet: Internet
) -> None:
    """DNS pins never open blocked ranges: private.example.test (allowed by the wildcard) answers 172.31.k.1,
    a private address where a server listens; only an allow_out CIDR opens it."""
    m = net_manager
    info = await m.create(network={"allow_out": ["*.example.test"], "deny_out": ["0.0.0.0/0"]})
    out = await probe(
        m, info.id, resolve=["private.example.test"], connect=[("private.example.test", 80), ("a.example.test", 80)]
    )
    assert out["private.example.test"] == internet.private  # the answer is passed on...
    assert out["private.example.test:80"] == "timeout"  # ...but the blocked range stays closed
    assert out["a.example.test:80"] == "ok"  # public answers of the same wildcard are pinned
    await m.update_network(info.id, {"allow_out": ["*.example.test", f"{internet.private}/32"]})
    out = await probe(m, info.id, connect=[("private.example.test", 80)])
    assert out["private.example.test:80"] == "ok"


async def test_wildcard_domains_and_denied_names(net_manager: Manager, internet: Internet) -> None:
    m = net_manager
    info = await m.create(network={"deny_out": ["b.example.test"]})
    assert m._net is not None
    await m._net.wait_idle()  # the daemon resolved the denied name itself and blocked its address
    out = await probe(m, info.id, resolve=["b.example.test"], connect=[(internet.public_b, 80)], timeout=1.0)
    assert out["b.example.test"].startswith("error")  # REFUSED by the forwarder
    assert out[f"{internet.public_b}:80"] == "timeout"  # and its address is blocked too
    wild = await m.create(network={"allow_out": ["*.b.example.test"], "deny_out": ["0.0.0.0/0"]})
    out = await probe(m, wild.id, connect=[("www.b.example.test", 80), (internet.public_a, 80)], timeout=1.0)
    assert out == {"www.b.example.test:80": "ok", f"{internet.public_a}:80": "timeout"}


async def test_policy_changes_live(net_manager: Manager, internet: Internet) -> None:
    m = net_manager
    info = await m.create()
    target = [(internet.public_a, 80)]
    key = f"{internet.public_a}:80"
    assert (await probe(m, info.id, connect=target))[key] == "ok"
    att = await m.update_network(info.id, {"deny_out": ["0.0.0.0/0"]})
    assert att.policy.deny_out.cidrs == ("0.0.0.0/0",)
    assert (await probe(m, info.id, connect=target, timeout=1.0))[key] == "timeout"
    await m.update_network(info.id, {"deny_out": []})
    assert (await probe(m, info.id, connect=target))[key] == "ok"
    await m.update_network(info.id, {"allow_internet_access": False})
    assert (await probe(m, info.id, connect=target, timeout=1.0))[key] == "timeout"
    await m.update_network(info.id, {"allow_out": [internet.public_a]})
    assert (await probe(m, info.id, connect=target))[key] == "ok"


async def test_an_established_connection_is_cut_by_a_policy_change(net_manager: Manager, internet: Internet) -> None:
    m = net_manager
    info = await m.create()
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{internet.public_a}',80),timeout=2)\n"
        "print('connected',flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100)[:12])\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    proc = await m.spawn(info.id, ["python3", "-c", script], stdin=True)
    out: list[bytes] = []
    async for item in proc:
        if isinstance(item, OutputChunk):
            out.append(item.data)
            if b"connected" in b"".join(out):
                break
    await m.update_network(info.id, {"allow_internet_access": False})
    await proc.send_stdin(b"go\n")
    await proc.close_stdin()
    async for item in proc:
        if isinstance(item, OutputChunk):
            out.append(item.data)
    text = b"".join(out).decode()
    assert "timeout" in text.lower(), text


async def test_invalid_entries_are_rejected_and_change_nothing(
    net_manager: Manager, net_settings: NetworkSettings
) -> None:
    m = net_manager
    for bad in (
        {"allow_out": ["not a name!"]},
        {"deny_out": ["2001:db8::/32"]},
        {"allow_out": "pypi.org"},
        {"allow_out": ["10.0.0.0/33"]},
        {"egress": []},
    ):
        with pytest.raises(NetworkPolicyError) as exc:
            await m.create(network=bad)
        assert exc.value.code == "invalid_network_policy"
    assert await m.list() == []
    assert host_network_state(net_settings)["ifaces"] == []
    info = await m.create()
    with pytest.raises(NetworkPolicyError):
        await m.update_network(info.id, {"deny_out": ["-bad-.com"]})
    assert (await m.get_network(info.id)).policy.deny_out.entries == []


async def test_forks_and_resets_keep_the_policy(net_manager: Manager, internet: Internet) -> None:
    m = net_manager
    info = await m.create(allow_internet_access=False, network={"allow_out": [internet.public_a]})
    [child] = await m.fork(info.id, 1)
    assert not isinstance(child, Exception)
    for sid in (child.id, (await m.reset(info.id)).id):
        att = await m.get_network(sid)
        assert att.policy.internet is False
        assert att.policy.allow_out.cidrs == (f"{internet.public_a}/32",)
        out = await probe(m, sid, connect=[(internet.public_a, 80), (internet.public_b, 80)], timeout=1.0)
        assert out == {f"{internet.public_a}:80": "ok", f"{internet.public_b}:80": "timeout"}


async def test_warm_pool_members_are_networked_and_the_claim_applies_the_policy(
    net_manager: Manager, internet: Internet
) -> None:
    m = net_manager
    await m.configure_pool(PoolConfig(template="default", min_size=2, target_free=2, max_size=4, memory_mb=256))
    await m.wait_pool_ready("default", 2)
    plain = await m.create(memory_mb=256)
    closed = await m.create(memory_mb=256, allow_internet_access=False)
    assert plain.source == closed.source == "warm"
    assert "network" not in plain.timings  # the veth was made while the member booted
    key = f"{internet.public_a}:80"
    assert (await probe(m, plain.id, connect=[(internet.public_a, 80)]))[key] == "ok"
    assert (await probe(m, closed.id, connect=[(internet.public_a, 80)], timeout=1.0))[key] == "timeout"
    await m.remove_pool("default")


async def test_sandboxes_survive_a_daemon_restart_with_their_network(
    default_template: TemplateInfo, data_dir: Path, internet: Internet
) -> None:
    ns = network_settings(internet)
    settings = make_settings(data_dir, network=ns, keep_sandboxes_on_shutdown=True)
    async with Manager.open(settings) as m:
        info = await m.create(network={"deny_out": [f"{internet.public_b}/32"]})
    try:
        async with Manager.open(settings) as m:
            att = await m.get_network(info.id)
            assert att.policy.deny_out.cidrs == (f"{internet.public_b}/32",)
            out = await probe(m, info.id, connect=[(internet.public_a, 80), (internet.public_b, 80)], timeout=1.0)
            assert out == {f"{internet.public_a}:80": "ok", f"{internet.public_b}:80": "timeout"}
            await m.destroy(info.id)
    finally:
        async with Manager.open(make_settings(data_dir, network=ns)) as m:
            for s in await m.list():
                await m.destroy(s.id)
    assert host_network_state(ns) == EMPTY


async def test_a_create_whose_agent_fails_while_its_network_is_wired_leaves_nothing(
    default_template: TemplateInfo, data_dir: Path, net_settings: NetworkSettings
) -> None:
    """The veth is wired while the agent's connection is made: when the connection fails first, the create waits
    for the wiring and removes it with everything else."""
    async with Manager.open(make_settings(data_dir, network=net_settings, agent_connect_timeout=0.001)) as m:
        for _ in range(3):
            with pytest.raises(TimeoutError_, match="no HELLO"):
                await m.create()
        assert await m.list() == []
        assert _sandbox_chains(net_settings) == []
        assert m._net is not None
        await m._net.wait_idle()
        assert host_network_state(net_settings)["ifaces"] == []
        assert m._net.addresses.in_use == 0


async def test_networking_off_means_loopback_only(default_template: TemplateInfo, data_dir: Path) -> None:
    async with Manager.open(make_settings(data_dir)) as m:
        info = await m.create()
        res = await m.exec(info.id, ["python3", "-c", "import socket; print(socket.if_nameindex())"])
        assert "eth0" not in res.stdout_text
        with pytest.raises(NotSupportedError):
            await m.create(allow_internet_access=True)
        with pytest.raises(NotSupportedError):
            await m.get_network(info.id)


async def test_fifty_networked_sandboxes_at_once(
    net_manager: Manager, internet: Internet, net_settings: NetworkSettings
) -> None:
    m = net_manager
    infos = await asyncio.gather(*(m.create(memory_mb=64) for _ in range(50)))
    addresses = {(await m.get_network(i.id)).address for i in infos}
    assert len(addresses) == 50
    assert len(host_network_state(net_settings)["ifaces"]) == 50
    for i in infos[::10]:  # every tenth reaches the internet
        out = await probe(m, i.id, connect=[(internet.public_a, 80)])
        assert out == {f"{internet.public_a}:80": "ok"}
    await asyncio.gather(*(m.destroy(i.id) for i in infos))
    assert _sandbox_chains(net_settings) == []  # rules go with destroy()
    assert m._net is not None
    await m._net.wait_idle()  # veths go in the background
    assert host_network_state(net_settings)["ifaces"] == []


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_two_hundred_create_destroy_cycles_leave_nothing(
    net_manager: Manager, net_settings: NetworkSettings
) -> None:
    m = net_manager
    for _ in range(20):
        infos = await asyncio.gather(*(m.create(memory_mb=64) for _ in range(10)))
        await asyncio.gather(*(m.destroy(i.id) for i in infos))
    assert m._net is not None
    await m._net.wait_idle()
    state = host_network_state(net_settings)
    assert state["ifaces"] == [] and state["routes"] == [] and state["addrs"] == []
    assert _sandbox_chains(net_settings) == []
    assert m._net is not None and m._net.addresses.in_use == 0


def _sandbox_chains(settings: NetworkSettings) -> list[Any]:
    """What sandboxes still have in the daemon's table: elements of the per-sandbox sets, or extra chains/sets."""
    doc = json.loads(sh("nft", "-j", "list", "table", "inet", settings.table))
    left: list[Any] = []
    base = {"blocked4", "owned", "offline", "allow", "deny", "pins", "pins2", "dpins", "prerouting", "postrouting",
            "input", "from_sandbox", "forward", "egress"}  # fmt: skip
    for item in doc["nftables"]:
        for kind in ("chain", "set", "map"):
            if kind in item and item[kind]["name"] not in base:
                left.append(item[kind]["name"])
        if "set" in item and item["set"]["name"] != "blocked4" and item["set"].get("elem"):
            left.append((item["set"]["name"], item["set"]["elem"]))
    return left
