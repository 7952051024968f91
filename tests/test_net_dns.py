"""The resolve-and-pin forwarder against an upstream resolver on loopback: who gets answers, what gets pinned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from branchbox.net import dns
from branchbox.net.dns import Client, DnsForwarder
from branchbox.net.policy import NetworkPolicy

ZONE = {
    "pypi.org.": "192.0.2.10",
    "evil.example.": "192.0.2.66",
    "www.example.com.": "192.0.2.20",
    "meta.example.com.": "169.254.169.254",  # an allowed wildcard whose owner points a name at the metadata service
    "intra.example.com.": "10.1.2.3",
    "local.example.com.": "127.0.0.1",
}


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        asyncio.get_running_loop().call_later(self.delay, self._answer, data, addr)

    def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        request = DNSRecord.parse(data)
        reply = request.reply()
        name = str(request.q.qname)
        if name in ZONE:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ZONE[name]), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(reply.pack(), addr)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[_Upstream, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0))
    try:
        yield proto, transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


def q(name: str) -> bytes:
    return bytes(DNSRecord.question(name, "A").pack())


async def test_answers_pins_and_refusals(upstream: tuple[_Upstream, tuple[str, int]]) -> None:
    _, addr = upstream
    pinned: list[list[str]] = []
    policies = {
        "10.9.0.2": NetworkPolicy.of(None, {"allow_out": ["pypi.org", "*.example.com"], "deny_out": ["evil.example"]}),
        "10.9.0.6": NetworkPolicy(internet=False),
    }

    def lookup(source: str) -> Client | None:
        policy = policies.get(source)
        return None if policy is None else Client(policy, pinned.append)

    fwd = DnsForwarder(lookup, addr, timeout=2)
    reply = DNSRecord.parse(await fwd.answer("10.9.0.2", q("pypi.org")))
    assert [str(r.rdata) for r in reply.rr] == ["192.0.2.10"]
    assert pinned == [["192.0.2.10"]]  # pinned before the answer was returned
    await fwd.answer("10.9.0.2", q("www.example.com"))
    assert pinned[-1] == ["192.0.2.20"]
    assert DNSRecord.parse(await fwd.answer("10.9.0.2", q("evil.example"))).header.rcode == RCODE.REFUSED
    assert DNSRecord.parse(await fwd.answer("10.9.0.6", q("pypi.org"))).header.rcode == RCODE.REFUSED
    other = DNSRecord.parse(await fwd.answer("10.9.0.2", q("nothing.test")))
    assert other.header.rcode == RCODE.NXDOMAIN
    assert len(pinned) == 2  # names not allowed pin nothing
    assert await fwd.answer("192.0.2.99", q("pypi.org")) is None  # not a sandbox: ignored
    assert await fwd.answer("10.9.0.2", b"\xff\x00garbage") is None


async def test_answers_in_blocked_ranges_are_not_pinned(upstream: tuple[_Upstream, tuple[str, int]]) -> None:
    """An allowed name opens no blocked range (metadata, private, loopback); an allow_out CIDR does."""
    _, addr = upstream
    pinned: list[list[str]] = []
    policies = {
        "10.9.0.2": NetworkPolicy.of(None, {"allow_out": ["*.example.com"], "deny_out": ["0.0.0.0/0"]}),
        "10.9.0.6": NetworkPolicy.of(None, {"allow_out": ["*.example.com", "10.1.2.0/24"]}),
    }

    def lookup(source: str) -> Client | None:
        policy = policies.get(source)
        return None if policy is None else Client(policy, pinned.append)

    fwd = DnsForwarder(lookup, addr, timeout=2)
    for name in ("meta.example.com", "intra.example.com", "local.example.com"):
        reply = DNSRecord.parse(await fwd.answer("10.9.0.2", q(name)))
        assert [str(r.rdata) for r in reply.rr] == [ZONE[name + "."]]  # the answer is passed on unchanged
    assert pinned == []  # ...and opens nothing
    await fwd.answer("10.9.0.2", q("www.example.com"))
    assert pinned == [["192.0.2.20"]]
    await fwd.answer("10.9.0.6", q("intra.example.com"))  # named by an allow_out CIDR: pinned
    await fwd.answer("10.9.0.6", q("meta.example.com"))  # that CIDR does not cover 169.254/16
    assert pinned == [["192.0.2.20"], ["10.1.2.3"]]


def test_pinnable_keeps_public_and_explicitly_allowed_addresses() -> None:
    policy = NetworkPolicy.of(None, {"allow_out": ["*.example.com", "172.16.5.0/24", "169.254.169.254"]})
    got = policy.pinnable(
        [
            "8.8.8.8",
            "10.0.0.1",
            "172.16.5.9",
            "172.16.6.1",
            "169.254.169.254",
            "169.254.1.1",
            "127.0.0.1",
            "100.64.0.1",
            "0.1.2.3",
            "224.0.0.1",
            "not-an-address",
        ]
    )
    assert got == ["8.8.8.8", "172.16.5.9", "169.254.169.254"]


async def test_a_flood_of_queries_is_capped_per_sandbox(upstream: tuple[_Upstream, tuple[str, int]]) -> None:
    proto, addr = upstream
    proto.delay = 0.2
    fwd = DnsForwarder(lambda s: Client(NetworkPolicy(), lambda a: None), addr, timeout=2)
    replies = await asyncio.gather(*(fwd.answer("10.9.0.2", q("pypi.org")) for _ in range(dns.MAX_IN_FLIGHT + 20)))
    assert sum(r is None for r in replies) == 20
    assert proto.queries == dns.MAX_IN_FLIGHT
    assert fwd._in_flight == {}


async def test_an_unreachable_upstream_is_servfail() -> None:
    fwd = DnsForwarder(lambda s: Client(NetworkPolicy(), lambda a: None), ("127.0.0.1", 9), timeout=0.5)
    reply = await fwd.answer("10.9.0.2", q("pypi.org"))
    assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
