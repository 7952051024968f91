"""Per-sandbox host uid/gid ranges (issue 22.1): which range of the daemon's block each sandbox maps to.

A daemon owns a block of ``ranges`` disjoint ranges of ``RANGE_SIZE`` host ids (claimed host-wide by
``daemon/claims.py``). Every container sandbox (and every warm pool member, and every spare shell the zygote keeps
ready) maps its root to the first id of a range of its own, so no two sandboxes share a host uid.

A range is in use while anything owns files or processes in it: a sandbox record (its processes and upper dir;
the record goes only after both are gone), a layer (a snapshot captured from a sandbox keeps its writer's ids
until the layer is deleted; flattening rewrites it to the canonical range), or a hold in memory (a boot in flight,
a spare shell lent to the zygote). ``in_use`` reads the first two from the store; :class:`IdRanges` keeps the
holds. A range is free only once nothing owns anything in it, so it may serve again at once: ranges are handed
out lowest first, which keeps the set of ranges in use as small as the number of sandboxes, and with it the
zygote's cache of user namespaces that map template layers onto them (a miss costs a fork of its maker on the
zygote's loop; round-robin over the whole block missed on every create and halved create throughput under load).

The canonical range (``CANONICAL``, host 100000) owns template trees, workspace checkouts and flattened layers on
disk; no sandbox of a daemon with a block runs in it (sandboxes see those layers through idmapped mounts). It is
also the one range every sandbox shared before this module existed: records of older daemons keep it.
"""

from __future__ import annotations

from collections.abc import Callable

from branchbox.errors import LimitExceededError

RANGE_SIZE = 65536  # ids per sandbox: uid 0..65535 inside
CANONICAL_BASE = 100000  # host uid of root in the canonical range (templates as stored on disk)


class IdRanges:
    """Hands out the ranges of one block: ``first`` + i * RANGE_SIZE for i in 0..ranges-1."""

    def __init__(self, first: int, ranges: int, in_use: Callable[[], set[int]]) -> None:
        if first % RANGE_SIZE or ranges < 1:
            raise ValueError(f"bad uid block {first}+{ranges}x{RANGE_SIZE}")
        self.first, self.ranges = first, ranges
        self._in_use = in_use
        self._holds: dict[int, str] = {}  # range base -> owner (a sandbox id, or "zygote" for spare shells)

    def owns(self, base: int) -> bool:
        return self.first <= base < self.first + self.ranges * RANGE_SIZE

    def take(self, owner: str) -> int:
        """A free range (its first host id), held for ``owner`` until :meth:`release`."""
        used = self._in_use() | set(self._holds)
        for i in range(self.ranges):
            base = self.first + i * RANGE_SIZE
            if base not in used:
                self._holds[base] = owner
                return base
        raise LimitExceededError(
            f"no free uid range: all {self.ranges} of this daemon's ranges are used by sandboxes, snapshot layers "
            "and spare shells; destroy sandboxes or delete snapshots, or raise uid_ranges in the daemon's config"
        )

    def hold(self, base: int, owner: str) -> None:
        """Keep a range out of use for ``owner`` (a sandbox whose teardown failed: processes may still run in it)
        until this process ends; a restart's reconcile kills what is left of it."""
        self._holds[base] = owner

    def transfer(self, base: int, owner: str) -> None:
        """Hand a held range to another owner (a spare shell's range becomes its sandbox's)."""
        self._holds[base] = owner

    def release(self, owner: str) -> None:
        """Drop the holds of ``owner`` (its range stays in use while the store still names it)."""
        for base in [b for b, o in self._holds.items() if o == owner]:
            del self._holds[base]

    def held(self, owner: str) -> list[int]:
        return [b for b, o in self._holds.items() if o == owner]

    def free_count(self) -> int:
        used = {b for b in self._in_use() | set(self._holds) if self.owns(b)}
        return self.ranges - len(used)
