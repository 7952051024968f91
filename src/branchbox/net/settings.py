"""Settings of sandbox networking (pure data; the daemon fills them from its config)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from branchbox.errors import BadRequestError

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,6}$")


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """``subnet`` is cut into one /30 per sandbox (host end .1, sandbox .2): a /16 serves 16384 sandboxes.

    ``table`` (the nftables table, family inet) and ``if_prefix`` (host-side veth names are ``if_prefix`` +
    slot in hex) must be unique per daemon on a host, like its subnet. ``dns_upstream`` is the resolver the
    host-side DNS forwarder asks (``host`` or ``host:port``); None: the first nameserver of /etc/resolv.conf.
    ``dns_port``: where the forwarder listens on the host (0: any free port); sandboxes always send to port 53,
    nftables redirects it."""

    subnet: str = "10.200.0.0/16"
    table: str = "branchbox"
    if_prefix: str = "bbn"
    dns_upstream: str | None = None
    dns_port: int = 0
    dns_timeout: float = 3.0
    enable_ip_forward: bool = True  # set net.ipv4.ip_forward=1 at start (needed to route sandbox traffic)

    def __post_init__(self) -> None:
        try:
            net = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise BadRequestError(f"network subnet {self.subnet!r}: {exc}") from exc
        if net.version != 4 or net.prefixlen > 28:
            raise BadRequestError(f"network subnet {self.subnet}: use an IPv4 network of /28 or larger")
        if not _NAME.match(self.table):
            raise BadRequestError(f"network table {self.table!r}: use 1-32 of a-z, 0-9, _ starting with a letter")
        if not _PREFIX.match(self.if_prefix):
            raise BadRequestError(f"network if_prefix {self.if_prefix!r}: use 2-7 of a-z, 0-9 starting with a letter")
        if not 0 <= self.dns_port < 65536:
            raise BadRequestError(f"network dns_port {self.dns_port} is out of range")

    @property
    def network(self) -> ipaddress.IPv4Network:
        net = ipaddress.ip_network(self.subnet)
        assert isinstance(net, ipaddress.IPv4Network)
        return net

    def upstream(self) -> tuple[str, int]:
        """The resolver the forwarder asks, as (host, port)."""
        raw = self.dns_upstream
        if raw is None:
            raw = _first_nameserver(Path("/etc/resolv.conf"))
        host, sep, port = raw.rpartition(":")
        if sep and host and "]" not in port and host.count(":") == 0:
            return host, int(port)
        return raw.strip("[]"), 53


def _first_nameserver(path: Path) -> str:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return "127.0.0.1"
