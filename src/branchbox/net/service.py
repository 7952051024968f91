"""Sandbox networking on one host: :class:`Network`, owned and called by the Manager.

``attach`` (at boot, also for warm pool members: off the claim path) gives a sandbox a /30 slot, its nftables
chain and sets, and a veth pair into its network namespace. ``apply`` changes its policy in one nftables
transaction (~0.1 ms, in-process: cheap enough for a claim). ``detach`` removes the rules, the veth and frees
the slot. ``start`` enables IPv4 forwarding, (re)creates the daemon's table and starts the DNS forwarder;
``aclose`` removes the table (sandboxes kept running lose egress until the daemon starts again and re-attaches
them through :meth:`restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dnslib import DNSRecord

import branchbox.net.links as links
import branchbox.net.rules as rules
from branchbox.errors import NetworkError
from branchbox.net.addresses import AddressPool, Slot
from branchbox.net.dns import Client, DnsForwarder, addresses_of, ask_upstream
from branchbox.net.nftables import Nft
from branchbox.net.policy import NetworkPolicy
from branchbox.net.settings import NetworkSettings

log = logging.getLogger("branchbox.net")

MAX_PINS = 4096  # addresses one sandbox may have pinned (the pin sets are shared: one sandbox must not fill them)
EXTRA_SLOT = "net.slot"
EXTRA_POLICY = "net.policy"


@dataclass(slots=True)
class Attachment:
    sandbox_id: str
    slot: Slot
    ifname: str
    policy: NetworkPolicy
    pins: dict[str, tuple[float, float]] = field(default_factory=dict)  # address -> expiry in pins, pins2
    denied: set[str] = field(default_factory=set)  # addresses of denied names (set dpins)

    @property
    def address(self) -> str:
        return str(self.slot.sandbox)

    def pinned(self) -> dict[str, list[str]]:
        """What this sandbox may have in the pin sets (some may have expired meanwhile)."""
        return {
            "pins": [a for a, (first, _) in self.pins.items() if first],
            "pins2": [a for a, (_, second) in self.pins.items() if second],
            "dpins": sorted(self.denied),
        }

    def extra(self) -> dict[str, str]:
        """What the Manager persists in the sandbox's handle to re-attach after a restart."""
        return {EXTRA_SLOT: str(self.slot.index), EXTRA_POLICY: self.policy.to_json()}


class Network:
    def __init__(self, settings: NetworkSettings) -> None:
        self.settings = settings
        self.prefix = settings.if_prefix + "-"
        self.addresses = AddressPool(settings.network)
        self._nft: Nft | None = None
        self._dns: DnsForwarder | None = None
        self._by_id: dict[str, Attachment] = {}
        self._by_ip: dict[str, Attachment] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # resolving denied names (cancelled at close)
        self._teardown: set[asyncio.Task[None]] = set()  # deleting veths of destroyed sandboxes (awaited)

    # ------------------------------------------------------------------ daemon lifecycle
    async def start(self) -> None:
        s = self.settings
        if s.enable_ip_forward and links.set_ip_forward():
            log.info("enabled net.ipv4.ip_forward (needed to route sandbox traffic)")
        self._nft = Nft()
        self._dns = DnsForwarder(self._client, s.upstream(), timeout=s.dns_timeout)
        try:
            port = await self._dns.start(s.dns_port)
            self._nft.run(rules.table_script(s.table, self.prefix, s.subnet, port))
        except BaseException:
            await self.aclose()
            raise
        log.info("sandbox network %s: table inet %s, DNS forwarder on port %d", s.subnet, s.table, port)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks or self._teardown:
            await asyncio.gather(*self._tasks, *self._teardown, return_exceptions=True)
        if self._dns is not None:
            await self._dns.aclose()
            self._dns = None
        if self._nft is not None:
            with contextlib.suppress(NetworkError):
                self._nft.run(rules.delete_table_script(self.settings.table))
            self._nft.close()
            self._nft = None
        self._by_id.clear()
        self._by_ip.clear()

    async def wait_idle(self) -> None:
        """Wait until background work started so far (resolving denied names, deleting veths) is done."""
        while pending := [t for t in (*self._tasks, *self._teardown) if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def dns_port(self) -> int:
        return 0 if self._dns is None else self._dns.port

    def _run(self, script: str) -> None:
        if self._nft is None:
            raise NetworkError("sandbox networking is not started")
        self._nft.run(script)

    # ------------------------------------------------------------------ per sandbox
    async def attach(self, sandbox_id: str, netns_pid: int, policy: NetworkPolicy) -> Attachment:
        """Give a booted sandbox its network. On failure nothing is left."""
        try:
            theirs, ours = os.stat(f"/proc/{netns_pid}/ns/net"), os.stat("/proc/self/ns/net")
        except OSError as exc:
            raise NetworkError(f"sandbox {sandbox_id}: its process {netns_pid} is gone ({exc.strerror})") from exc
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            raise NetworkError(
                f"sandbox {sandbox_id}: process {netns_pid} shares the daemon's network namespace; a backend that "
                "declares Capabilities.network must give each sandbox its own"
            )
        slot = self.addresses.allocate()
        att = Attachment(sandbox_id, slot, rules.ifname(self.prefix, slot.index), policy)
        try:
            await links.delete_veth(att.ifname)  # a leftover of a crashed daemon
            self._run(rules.add_sandbox_script(self.settings.table, att.ifname, att.address, policy))
            try:
                await links.create_veth(att.ifname, slot, netns_pid)
            except BaseException:
                self._remove_rules(att)
                raise
        except BaseException:
            self.addresses.release(slot.index)
            raise
        self._register(att)
        return att

    def restore(self, sandbox_id: str, extra: Mapping[str, str]) -> Attachment | None:
        """Re-attach a sandbox that kept running while the daemon was down (its veth still exists)."""
        if EXTRA_SLOT not in extra:
            return None
        try:
            slot = self.addresses.reserve(int(extra[EXTRA_SLOT]))
            policy = NetworkPolicy.from_json(extra.get(EXTRA_POLICY, "{}"))
        except ValueError as exc:  # the subnet setting changed meanwhile, or a record from another version
            raise NetworkError(f"sandbox {sandbox_id}: cannot restore its network: {exc}") from exc
        att = Attachment(sandbox_id, slot, rules.ifname(self.prefix, slot.index), policy)
        self._run(rules.add_sandbox_script(self.settings.table, att.ifname, att.address, policy))
        self._register(att)
        return att

    def _register(self, att: Attachment) -> None:
        self._by_id[att.sandbox_id] = att
        self._by_ip[att.address] = att
        self._pin_denied(att)

    def apply(self, sandbox_id: str, policy: NetworkPolicy) -> Attachment:
        """Replace the sandbox's policy (one nftables transaction; established connections follow at once)."""
        att = self.get(sandbox_id)
        script = rules.policy_change(self.settings.table, att.address, att.policy, policy, att.pinned())
        if script:
            self._run(script)
            att.pins.clear()
            att.denied.clear()
        att.policy = policy
        self._pin_denied(att)
        return att

    def get(self, sandbox_id: str) -> Attachment:
        att = self._by_id.get(sandbox_id)
        if att is None:
            raise NetworkError(f"sandbox {sandbox_id} has no network")
        return att

    def find(self, sandbox_id: str) -> Attachment | None:
        return self._by_id.get(sandbox_id)

    async def loopback_socket(self, netns_pid: int) -> socket.socket:
        """An unconnected TCP socket in the (attached) sandbox's namespace: its 127.0.0.1 is the sandbox's."""
        return await links.loopback_socket(netns_pid)

    async def detach(self, sandbox_id: str, extra: Mapping[str, str] | None = None) -> None:
        """Remove the sandbox's rules and veth and free its slot. Idempotent; works from a persisted handle."""
        att = self._by_id.pop(sandbox_id, None)
        if att is None and extra is not None and EXTRA_SLOT in extra:
            index = int(extra[EXTRA_SLOT])
            slot = self.addresses.slot(index)
            att = Attachment(sandbox_id, slot, rules.ifname(self.prefix, index), NetworkPolicy())
        if att is None:
            return
        if self._by_ip.get(att.address) is att:
            del self._by_ip[att.address]
        # deletions load libnftables' element cache (ms with many sandboxes): not on the event loop
        await asyncio.to_thread(self._remove_rules, att)
        # the veth goes in the background (~10 ms of the kernel's; it also goes with the sandbox's namespace);
        # its slot is free again only then
        task = asyncio.get_running_loop().create_task(self._delete_veth(att))
        self._teardown.add(task)
        task.add_done_callback(self._teardown.discard)

    async def _delete_veth(self, att: Attachment) -> None:
        try:
            await links.delete_veth(att.ifname)
        except NetworkError as exc:
            log.warning("deleting %s of sandbox %s failed: %s", att.ifname, att.sandbox_id, exc)
        finally:
            if not any(a.slot.index == att.slot.index for a in self._by_id.values()):
                self.addresses.release(att.slot.index)

    def _remove_rules(self, att: Attachment) -> None:
        script = rules.remove_sandbox_script(self.settings.table, att.ifname, att.address, att.policy, att.pinned())
        with contextlib.suppress(NetworkError):  # already gone (a restart recreated the table)
            self._run(script)

    async def remove_orphans(self) -> list[str]:
        """Delete veths of this daemon's prefix that no attached sandbox owns (after a crash)."""
        mine = {a.ifname for a in self._by_id.values()}
        gone = []
        for name in sorted(os.listdir("/sys/class/net")):
            if name.startswith(self.prefix) and name not in mine:
                await links.delete_veth(name)
                gone.append(name)
        return gone

    def interfaces(self) -> list[str]:
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(self.prefix))

    # ------------------------------------------------------------------ DNS
    def _client(self, source: str) -> Client | None:
        att = self._by_ip.get(source)
        if att is None:
            return None
        return Client(att.policy, lambda addrs: self._pin(att, addrs, allow=True))

    def _pin(self, att: Attachment, addrs: list[str], *, allow: bool) -> None:
        """Pin addresses for rules.PIN_TIMEOUT_S. Re-adding an element does not renew its timeout, so an
        allowed address is renewed by adding it to the other of its two sets (pins, pins2) once less than half its
        time is left; by then the entry in that other set has expired (entries are > half a timeout apart)."""
        if self._by_id.get(att.sandbox_id) is not att:
            return  # destroyed meanwhile
        adds: dict[str, list[str]] = {"pins": [], "pins2": [], "dpins": []}
        if allow:
            now, ttl = time.monotonic(), float(rules.PIN_TIMEOUT_S)
            for addr in addrs:
                if addr not in att.pins and len(att.pins) >= MAX_PINS:
                    log.warning("sandbox %s has %d pinned addresses: not pinning more", att.sandbox_id, MAX_PINS)
                    break
                in_p, in_r = att.pins.get(addr, (0.0, 0.0))
                if max(in_p, in_r) - now >= ttl / 2:
                    continue
                if in_p <= in_r:
                    adds["pins"].append(addr)
                    in_p = now + ttl
                else:
                    adds["pins2"].append(addr)
                    in_r = now + ttl
                att.pins[addr] = (in_p, in_r)
        else:
            adds["dpins"] = [a for a in addrs if a not in att.denied][: max(0, MAX_PINS - len(att.denied))]
            att.denied.update(adds["dpins"])
        script = rules.pin_script(self.settings.table, att.address, adds)
        if not script:
            return
        try:
            self._run(script)
        except NetworkError as exc:
            log.warning("pinning %s for sandbox %s failed: %s", addrs, att.sandbox_id, exc)

    def _pin_denied(self, att: Attachment) -> None:
        """Resolve the sandbox's denied names (not wildcards) and block their addresses too, so a sandbox
        that learnt an address elsewhere cannot connect to a denied name directly. Off the caller's path."""
        names = [d for d in att.policy.deny_out.domains if not d.startswith("*.")]
        if not names or self._dns is None:
            return
        task = asyncio.get_running_loop().create_task(self._resolve_and_deny(att, names))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve_and_deny(self, att: Attachment, names: list[str]) -> None:
        for name in names:
            query = bytes(DNSRecord.question(name, "A").pack())
            try:
                reply = await ask_upstream(self.settings.upstream(), query, self.settings.dns_timeout)
            except (TimeoutError, OSError):
                continue
            addrs = addresses_of(reply)
            if addrs:
                self._pin(att, addrs, allow=False)
