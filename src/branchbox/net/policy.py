"""The egress policy of one sandbox: what it may reach outside its own network namespace.

Semantics (evaluated in this order for every packet a sandbox sends; the first match decides):

1. ``allow_out`` CIDRs, and the addresses the host's DNS forwarder resolved for ``allow_out`` domain names: allowed
   (resolved addresses in a blocked range only when an ``allow_out`` CIDR names them too: see :meth:`pinnable`).
2. ``deny_out`` CIDRs, and the addresses resolved for ``deny_out`` domain names: dropped.
3. Blocked ranges (:data:`BLOCKED_V4`: private, shared, loopback, link-local/metadata, multicast, reserved): dropped.
4. Anything else (the public internet): allowed when ``internet`` is True, else dropped.

So ``allow_out`` wins over ``deny_out`` (``deny_out=["0.0.0.0/0"]`` plus a few ``allow_out`` entries is an
allow list), and private ranges are reachable only when named in ``allow_out``. The host itself (any of its
addresses, the daemon included) is never reachable: that is enforced on the host's input hook, not here.
IPv6 is not routed to sandboxes at all (they get no IPv6 address; IPv6 entries are rejected).

Domain names are enforced without trusting the sandbox's DNS: every DNS packet a sandbox sends (to any server)
is redirected to a forwarder on the host, which resolves the name itself and pins the answers into the sandbox's
nftables sets before replying. ``example.com`` matches that name only; ``*.example.com`` matches its subdomains.
A denied name is answered REFUSED.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from branchbox.errors import NetworkPolicyError

MAX_ENTRIES = 1024

#: Destinations no sandbox reaches unless ``allow_out`` names them (RFC 6890 special-purpose ranges).
BLOCKED_V4: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private (RFC 1918)
    "100.64.0.0/10",  # carrier-grade NAT shared space (RFC 6598): often a cloud's internal network
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local: cloud metadata services (169.254.169.254) live here
    "172.16.0.0/12",  # private (RFC 1918)
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private (RFC 1918)
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/3",  # multicast and reserved (224/4, 240/4, broadcast)
)
_BLOCKED_NETS = tuple(ipaddress.IPv4Network(n) for n in BLOCKED_V4)
#: IPv6 equivalents (documented; IPv6 is dropped entirely for sandboxes).
BLOCKED_V6: tuple[str, ...] = ("::1/128", "fc00::/7", "fe80::/10", "ff00::/8")

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _domain(entry: str) -> str | None:
    """A normalised domain name (``*.`` prefix kept) or None when ``entry`` is not one."""
    name = entry.strip().lower().rstrip(".")
    body = name[2:] if name.startswith("*.") else name
    labels = body.split(".")
    if len(body) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        return None
    if labels[-1].isdigit():  # 1.2.3.4 is an address, 1.2.3.4.5 is nothing
        return None
    return name


@dataclass(frozen=True, slots=True)
class Rules:
    """One list (allow_out or deny_out) split into IPv4 networks and domain names."""

    cidrs: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[Any], field: str) -> Rules:
        if isinstance(entries, str | bytes) or not isinstance(entries, Iterable):
            raise NetworkPolicyError(f"{field} must be a list of CIDRs and domain names, not {entries!r}")
        cidrs: list[str] = []
        domains: list[str] = []
        for raw in entries:
            if not isinstance(raw, str) or not raw.strip():
                raise NetworkPolicyError(f"{field}: {raw!r} is not a CIDR or a domain name")
            entry = raw.strip()
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                name = _domain(entry)
                if name is None:
                    raise NetworkPolicyError(
                        f"{field}: {entry!r} is neither a CIDR (like 203.0.113.0/24 or 1.2.3.4) nor a domain name "
                        "(like pypi.org or *.example.com)",
                        entry=entry,
                    ) from None
                if name not in domains:
                    domains.append(name)
                continue
            if net.version != 4:
                raise NetworkPolicyError(
                    f"{field}: {entry!r} is IPv6; sandboxes have IPv4 only, so IPv6 entries would do nothing",
                    entry=entry,
                )
            if str(net) not in cidrs:
                cidrs.append(str(net))
        if len(cidrs) + len(domains) > MAX_ENTRIES:
            raise NetworkPolicyError(f"{field} has more than {MAX_ENTRIES} entries")
        return cls(tuple(cidrs), tuple(domains))

    @property
    def entries(self) -> list[str]:
        return [*self.cidrs, *self.domains]

    def matches_domain(self, qname: str) -> bool:
        name = qname.lower().rstrip(".")
        for d in self.domains:
            if d.startswith("*."):
                if name.endswith(d[1:]):
                    return True
            elif name == d:
                return True
        return False


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """What one sandbox may reach. The default: the public internet, nothing private."""

    internet: bool = True
    allow_out: Rules = Rules()
    deny_out: Rules = Rules()

    @classmethod
    def of(cls, allow_internet_access: bool | None = None, network: Mapping[str, Any] | None = None) -> NetworkPolicy:
        """From the create() arguments: ``network`` has ``allow_out`` and ``deny_out`` lists."""
        return cls().updated(network or {}, allow_internet_access=allow_internet_access)

    def updated(self, patch: Mapping[str, Any], *, allow_internet_access: bool | None = None) -> NetworkPolicy:
        """A copy with the keys present in ``patch`` replaced (``allow_out``, ``deny_out``,
        ``allow_internet_access``); absent keys keep their value."""
        if not isinstance(patch, Mapping):
            raise NetworkPolicyError(f"network must be an object with allow_out/deny_out lists, not {patch!r}")
        unknown = sorted(set(patch) - {"allow_out", "deny_out", "allow_internet_access"})
        if unknown:
            raise NetworkPolicyError(
                f"unknown network setting(s) {', '.join(unknown)}: use allow_out, deny_out, allow_internet_access"
            )
        out = self
        if "allow_out" in patch:
            out = replace(out, allow_out=Rules.parse(patch["allow_out"] or [], "allow_out"))
        if "deny_out" in patch:
            out = replace(out, deny_out=Rules.parse(patch["deny_out"] or [], "deny_out"))
        internet = patch.get("allow_internet_access", allow_internet_access)
        if internet is not None:
            if not isinstance(internet, bool):
                raise NetworkPolicyError(f"allow_internet_access must be true or false, not {internet!r}")
            out = replace(out, internet=internet)
        return out

    @property
    def uses_dns(self) -> bool:
        """The sandbox gets DNS answers when it may reach something outside."""
        return self.internet or bool(self.allow_out.cidrs or self.allow_out.domains)

    def pinnable(self, addrs: Iterable[str]) -> list[str]:
        """The addresses of an allowed name's DNS answer that may be pinned: those outside the blocked ranges, and
        blocked ones only when an ``allow_out`` CIDR names them (a name is never an explicit allow for a blocked
        range: its owner, or whoever spoofs its answer, picks the address)."""
        allowed = [ipaddress.IPv4Network(c) for c in self.allow_out.cidrs]
        out: list[str] = []
        for raw in addrs:
            try:
                addr = ipaddress.IPv4Address(raw)
            except ValueError:
                continue
            if any(addr in n for n in _BLOCKED_NETS) and not any(addr in n for n in allowed):
                continue
            out.append(str(addr))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "allow_internet_access": self.internet,
            "allow_out": self.allow_out.entries,
            "deny_out": self.deny_out.entries,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> NetworkPolicy:
        return cls().updated(json.loads(raw))
