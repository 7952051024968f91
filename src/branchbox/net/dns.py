"""The host-side DNS forwarder: resolve-and-pin.

nftables redirects every DNS packet a sandbox sends (UDP and TCP port 53, whatever server it names) here. For a
query from a sandbox the forwarder

* answers REFUSED when the sandbox may reach nothing outside, or the name is in its ``deny_out``;
* otherwise asks the upstream resolver itself, and when the name is in the sandbox's ``allow_out``, adds every
  IPv4 address of the answer to the sandbox's nftables allow set **before** replying, so the sandbox can connect
  to exactly the addresses it was told, except addresses in the blocked ranges (private, link-local/metadata,
  loopback...) that no ``allow_out`` CIDR names: an allowed name (``*.example.com``) whose owner points it at
  169.254.169.254 or 10.0.0.1 opens nothing (:meth:`NetworkPolicy.pinnable`). The sandbox never talks to a
  resolver directly and cannot forge an answer that opens anything.

Queries from addresses that are not a sandbox's are ignored (the port is also closed to them by nftables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

from branchbox.net.policy import NetworkPolicy

log = logging.getLogger("branchbox.net.dns")
MAX_TCP_MESSAGE = 65535
MAX_IN_FLIGHT = 64  # queries of one sandbox being resolved at once; more are dropped (a flood costs it, not us)


@dataclass(frozen=True, slots=True)
class Client:
    """What the forwarder needs to know about the sandbox a query came from."""

    policy: NetworkPolicy
    pin: Callable[[list[str]], None]  # add addresses to the sandbox's allow set


Lookup = Callable[[str], Client | None]


class _UpstreamReply(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == self.query_id and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def ask_upstream(upstream: tuple[str, int], query: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _UpstreamReply(struct.unpack("!H", query[:2])[0]), remote_addr=upstream
    )
    try:
        transport.sendto(query)
        async with asyncio.timeout(timeout):
            return await proto.reply
    finally:
        transport.close()


def _refused(request: DNSRecord) -> bytes:
    reply = request.reply()
    reply.header.rcode = RCODE.REFUSED
    return bytes(reply.pack())


def _servfail(request: DNSRecord) -> bytes:
    reply = request.reply()
    reply.header.rcode = RCODE.SERVFAIL
    return bytes(reply.pack())


def addresses_of(answer: bytes) -> list[str]:
    """The IPv4 addresses (A records) in a DNS answer."""
    try:
        record = DNSRecord.parse(answer)
    except Exception:  # a malformed answer pins nothing
        return []
    return [str(rr.rdata) for rr in record.rr if rr.rtype == QTYPE.A]


class DnsForwarder:
    def __init__(self, lookup: Lookup, upstream: tuple[str, int], *, timeout: float = 3.0) -> None:
        self.lookup = lookup
        self.upstream = upstream
        self.timeout = timeout
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = {}

    async def start(self, port: int) -> int:
        """Listen on UDP and TCP ``port`` (0: a free port, the same for both); return the port."""
        loop = asyncio.get_running_loop()
        for _ in range(20):  # with port 0 the UDP port might be taken for TCP: try another
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _Udp(self),
                local_addr=("0.0.0.0", port),  # noqa: S104 - nftables admits sandboxes only
            )
            bound = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, "0.0.0.0", bound)  # noqa: S104
            except OSError:
                transport.close()
                if port:
                    raise
                continue
            self._udp = transport
            self.port = bound
            return bound
        raise OSError("no free port for the DNS forwarder")

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coro: asyncio.Future[None] | object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, source: str, query: bytes) -> bytes | None:
        """The reply to send to ``source`` (None: ignore the packet)."""
        client = self.lookup(source)
        if client is None:
            return None
        busy = self._in_flight.get(source, 0)
        if busy >= MAX_IN_FLIGHT:
            return None
        self._in_flight[source] = busy + 1
        try:
            return await self._answer(client, query)
        finally:
            left = self._in_flight[source] - 1
            if left:
                self._in_flight[source] = left
            else:
                del self._in_flight[source]

    async def _answer(self, client: Client, query: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(query)
        except Exception:  # whatever a sandbox sends: garbage is dropped
            return None
        if not request.questions:
            return _refused(request)
        qname = str(request.questions[0].qname)
        policy = client.policy
        if not policy.uses_dns or policy.deny_out.matches_domain(qname):
            return _refused(request)
        try:
            reply = await ask_upstream(self.upstream, query, self.timeout)
        except (TimeoutError, OSError) as exc:
            log.debug("dns: upstream %s failed for %s: %s", self.upstream, qname, exc)
            return _servfail(request)
        if policy.allow_out.matches_domain(qname):
            answered = addresses_of(reply)
            addrs = policy.pinnable(answered)
            if len(addrs) < len(answered):
                log.info(
                    "dns: %s answered blocked address(es) %s: not pinned", qname, sorted(set(answered) - set(addrs))
                )
            if addrs:
                client.pin(addrs)
        return reply

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        try:
            while True:
                async with asyncio.timeout(self.timeout * 2):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    query = await reader.readexactly(size)
                reply = await self.answer(source, query)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DnsForwarder) -> None:
        self.forwarder = forwarder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.forwarder.spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.forwarder.answer(addr[0], data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
