"""Address slots: the daemon's subnet cut into /30s, one per sandbox (host end .1, sandbox end .2).

Slots are handed out round-robin (the next free one after the last given), so a slot just released (whose veth
the kernel may still be tearing down) is the last to be reused.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from branchbox.errors import LimitExceededError


@dataclass(frozen=True, slots=True)
class Slot:
    index: int
    host: ipaddress.IPv4Address  # the host end of the veth: the sandbox's gateway
    sandbox: ipaddress.IPv4Address  # the sandbox's eth0
    prefixlen: int = 30


class AddressPool:
    def __init__(self, subnet: ipaddress.IPv4Network) -> None:
        self.subnet = subnet
        self.size = subnet.num_addresses // 4
        self._used: set[int] = set()
        self._next = 0

    def slot(self, index: int) -> Slot:
        if not 0 <= index < self.size:
            raise ValueError(f"slot {index} is outside {self.subnet}")
        base = int(self.subnet.network_address) + 4 * index
        return Slot(index, ipaddress.IPv4Address(base + 1), ipaddress.IPv4Address(base + 2))

    def allocate(self) -> Slot:
        for i in range(self.size):
            index = (self._next + i) % self.size
            if index not in self._used:
                self._used.add(index)
                self._next = (index + 1) % self.size
                return self.slot(index)
        raise LimitExceededError(
            f"all {self.size} sandbox addresses of {self.subnet} are in use: use a larger network subnet"
        )

    def reserve(self, index: int) -> Slot:
        """Mark a slot used (re-attaching a sandbox after a restart)."""
        slot = self.slot(index)
        self._used.add(index)
        return slot

    def release(self, index: int) -> None:
        self._used.discard(index)

    @property
    def in_use(self) -> int:
        return len(self._used)

    def index_of(self, address: str) -> int | None:
        """The slot whose sandbox end is ``address``, if any."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return None
        if ip not in self.subnet:
            return None
        offset = int(ip) - int(self.subnet.network_address)
        return offset // 4 if offset % 4 == 2 else None
