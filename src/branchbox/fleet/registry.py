"""The fleet's registry of nodes and its allocator: pure Python, no Ray, no I/O, no clock of its own.

Each node pushes its capacity (:class:`Capacity`): the templates it holds and its free warm-pool members per
(template, backend), free memory (MiB) and CPU (millicores), running sandboxes, and a sequence number. The
registry keeps, per (template, backend) *key*, two indexes of the nodes holding that template: all of them, and
those with a free warm member. ``allocate`` is filter -> score -> select over one index, not a scan of the fleet:

* **score**: a node with a free warm member of the key first (a claim, not a boot), then the registry's policy:
  ``spread`` takes the node with the most free memory (the top of a heap; ties: the node registered first),
  ``pack`` the node with the least free memory that still fits (a bisection of a sorted list to the request's
  size; ties in no fixed order).
* **filter** (checked on the candidates the order yields, so usually on the first one): free memory and CPU fit,
  labels match, not draining, not lost, heard from within ``stale_after`` seconds.

An allocation *reserves* its memory and CPU on the node (and the warm member it counted on) until
:meth:`Registry.release` (the create failed: the capacity comes back) or :meth:`Registry.commit` (the node made
the sandbox: its pushes count it, once a push read after the create arrives; until ``commit_grace`` seconds
have passed, the reservation stays, so a push read just before the create cannot make the node look empty).
Pushes are authoritative, minus those reservations, and a push older than the last one seen (a lower ``seq``)
is ignored.

Cost: an allocation lowers one node's free memory, which moves that node in the index of every key it holds.
Under ``spread`` those moves are lazy: a heap entry keeps the free memory at its placement, an upper bound of
the node's current figure (between pushes capacity only goes down), so an out-of-date entry surfaces before the
true maximum and is moved then (``heapreplace``, C); a push that lowers or keeps a node's memory leaves its
entries alone for the same reason. Under ``pack`` an out-of-date entry could hide a tighter fit, so the chosen
node is moved at once (a sorted list's remove + add) in the index it was picked from and marked dirty in the
others, each of which moves its dirty nodes before its next pick: pack fills the fullest node again and again,
so most allocations move one entry, not one per key the node holds (measured: 1.6x less CPU per allocation at
1,000 nodes, 2.4x at 10,000). Either way O(log n) per key, plus one step per candidate the filter turns down
(labels, CPU and staleness are not indexed: a request whose labels match few nodes of a big key steps past the
others). Eager changes that raise a node's memory (push, release) and drains leave the old heap entry behind as
garbage, recognised by identity and compacted when it outgrows the live entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush, heapreplace
from types import MappingProxyType
from typing import Literal, NamedTuple

from sortedcontainers import SortedList

from branchbox.errors import BadRequestError, NoCapacityError, NodeNotFoundError

Key = tuple[str, str]  # (template, backend)
Slot = tuple[Key, bool]  # (key, warm index?)
Entry = tuple[int, int]  # spread: (-free memory, order); pack: (free memory, -order)
Policy = Literal["spread", "pack"]
POLICIES: tuple[Policy, ...] = ("spread", "pack")


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a node pushes. ``templates``: the (template, backend) keys it can create; ``warm``: free warm-pool
    members per key (a key with members counts as held even when missing from ``templates``)."""

    memory_mb: int
    cpu_millis: int
    running: int = 0
    templates: frozenset[Key] = frozenset()
    warm: Mapping[Key, int] = field(default_factory=dict)


class Request(NamedTuple):
    template: str
    backend: str
    memory_mb: int
    cpu_millis: int
    labels: tuple[tuple[str, str], ...] = ()


class Allocation(NamedTuple):
    node_id: str
    url: str
    key: Key
    memory_mb: int
    cpu_millis: int
    warm: bool


class NodeView(NamedTuple):
    """A node as ``list`` shows it (a copy: changing it changes nothing)."""

    node_id: str
    url: str
    labels: Mapping[str, str]
    memory_mb: int
    cpu_millis: int
    running: int
    warm: Mapping[Key, int]
    templates: frozenset[Key]
    draining: bool
    lost: bool
    last_seen: float
    seq: int


class _Node:
    __slots__ = (
        "committed",
        "cpu",
        "draining",
        "entries",
        "held",
        "labels",
        "lost",
        "mem",
        "node_id",
        "order",
        "pending_cpu",
        "pending_mem",
        "pushed",
        "running",
        "seen",
        "seq",
        "url",
        "warm",
    )

    def __init__(self, node_id: str, url: str, labels: Mapping[str, str], order: int) -> None:
        self.node_id, self.url, self.order = node_id, url, order
        self.labels: Mapping[str, str] = MappingProxyType(dict(labels))  # replaced, never changed in place
        self.held: frozenset[Key] = frozenset()
        self.mem = self.cpu = self.running = self.pending_mem = self.pending_cpu = 0
        # creates the node answered, kept counted for ``commit_grace`` s: (when, memory, cpu, id its destroy names)
        self.committed: list[tuple[float, int, int, str]] = []
        self.seq = -1
        self.seen = 0.0
        self.draining = self.lost = False
        self.warm: dict[Key, int] = {}
        self.pushed: Capacity = Capacity(0, 0)
        # the live entry this node has in each index it is in
        self.entries: dict[Slot, Entry] = {}

    def fits(self, req: Request, oldest: float) -> bool:
        return (
            self.cpu >= req.cpu_millis
            and self.seen >= oldest
            and (not req.labels or all(self.labels.get(k) == v for k, v in req.labels))
        )


class _SpreadIndex:
    """A max-heap on free memory (``heapq`` on -memory) with lazy moves and identity-checked garbage."""

    __slots__ = ("garbage", "heap")

    def __init__(self) -> None:
        self.heap: list[Entry] = []
        self.garbage = 0

    def __bool__(self) -> bool:
        return len(self.heap) > self.garbage

    def put(self, node: _Node, slot: Slot, by_order: dict[int, _Node]) -> None:
        old = node.entries.get(slot)
        if old is not None:
            if -old[0] >= node.mem:
                return  # still an upper bound (the memory went down or stayed): moved lazily when it surfaces
            self.garbage += 1  # the old entry stays in the heap, dead
        entry = (-node.mem, node.order)
        node.entries[slot] = entry
        heappush(self.heap, entry)
        if self.garbage > 64 and self.garbage * 2 > len(self.heap):
            self.compact(slot, by_order)

    def drop(self, node: _Node, slot: Slot) -> None:
        if node.entries.pop(slot, None) is not None:
            self.garbage += 1

    def compact(self, slot: Slot, by_order: dict[int, _Node]) -> None:
        live = []
        for e in self.heap:
            node = by_order.get(e[1])
            if node is not None and node.entries.get(slot) is e:
                live.append(e)
        heapify(live)
        self.heap, self.garbage = live, 0

    def pick(self, slot: Slot, req: Request, oldest: float, by_order: dict[int, _Node]) -> _Node | None:
        heap, warm, key = self.heap, slot[1], slot[0]
        turned_down: list[Entry] = []
        found = None
        while heap:
            entry = heap[0]
            node = by_order.get(entry[1])
            if node is None or node.entries.get(slot) is not entry:  # garbage
                heappop(heap)
                self.garbage -= 1
                continue
            if warm and node.warm.get(key, 0) <= 0:  # no member left: out of the warm index
                heappop(heap)
                del node.entries[slot]
                continue
            if -entry[0] != node.mem:  # out of date (an upper bound): move it down
                fresh = (-node.mem, node.order)
                node.entries[slot] = fresh
                heapreplace(heap, fresh)
                continue
            if node.mem < req.memory_mb:  # the most free memory of all: nothing fits
                break
            if node.fits(req, oldest):
                found = node
                break
            turned_down.append(heappop(heap))
        for entry in turned_down:
            heappush(heap, entry)
        return found


class _PackIndex:
    """A sorted list on free memory, one entry per node, exact whenever a pick reads it: an allocation moves
    the chosen node at once in the index it was picked from and marks it ``dirty`` in its other indexes, which
    move it before their next pick. A node picked many times in a row (pack fills the fullest node first) is
    moved once per index, not once per allocation."""

    __slots__ = ("dirty", "sl")

    def __init__(self) -> None:
        self.sl = SortedList()
        self.dirty: set[_Node] = set()

    def __bool__(self) -> bool:
        return bool(self.sl)

    def put(self, node: _Node, slot: Slot, by_order: dict[int, _Node]) -> None:
        old = node.entries.get(slot)
        entry = (node.mem, -node.order)
        if old == entry:
            return
        if old is not None:
            self.sl.remove(old)
        node.entries[slot] = entry
        self.sl.add(entry)

    def drop(self, node: _Node, slot: Slot) -> None:
        old = node.entries.pop(slot, None)
        if old is not None:
            self.sl.remove(old)

    def flush(self, slot: Slot, by_order: dict[int, _Node]) -> None:
        """Move the nodes whose free memory changed since this index last saw them."""
        dirty, self.dirty = self.dirty, set()
        for node in dirty:
            if slot in node.entries:  # still in this index (a drain or a push may have taken it out)
                self.put(node, slot, by_order)

    def pick(self, slot: Slot, req: Request, oldest: float, by_order: dict[int, _Node]) -> _Node | None:
        if self.dirty:
            self.flush(slot, by_order)
        warm, key, sl = slot[1], slot[0], self.sl
        while True:
            for entry in sl.irange((req.memory_mb, -(1 << 62))):
                node = by_order[-entry[1]]
                if warm and node.warm.get(key, 0) <= 0:
                    self.drop(node, slot)
                    break  # the iterator is out of date: start again
                if node.mem != entry[0]:
                    self.put(node, slot, by_order)
                    break
                if node.fits(req, oldest):
                    return node
            else:
                return None


_Index = _SpreadIndex | _PackIndex


class Registry:
    """Nodes and their capacity; ``allocate`` / ``commit`` / ``release``. Not thread-safe: one owner (the
    controller) calls it. Times are the caller's monotonic seconds."""

    def __init__(self, *, policy: Policy = "spread", stale_after: float = 3.0, commit_grace: float = 2.0) -> None:
        if policy not in POLICIES:
            raise BadRequestError(f"placement policy {policy!r} is unknown: use one of {', '.join(POLICIES)}")
        self.policy = policy
        self.stale_after = stale_after
        self.commit_grace = commit_grace
        self._make = _SpreadIndex if policy == "spread" else _PackIndex
        # pack's order needs exact entries (an out-of-date one can hide a tighter fit): moved at once
        self._eager = policy == "pack"
        self._nodes: dict[str, _Node] = {}
        self._by_order: dict[int, _Node] = {}
        self._index: dict[Slot, _Index] = {}
        self._next_order = 0

    # ------------------------------------------------------------------ membership and pushes

    def register(
        self,
        node_id: str,
        url: str,
        capacity: Capacity,
        *,
        labels: Mapping[str, str] | None = None,
        seq: int = 0,
        now: float,
    ) -> None:
        """Add a node, or take a known one back (a rejoin: its reservations are dropped, it is no longer lost)."""
        node = self._nodes.get(node_id)
        if node is None:
            node = _Node(node_id, url, labels or {}, self._next_order)
            self._next_order += 1
            self._nodes[node_id] = node
            self._by_order[node.order] = node
        else:
            node.url = url
            node.labels = MappingProxyType(dict(labels or {}))
            node.pending_mem = node.pending_cpu = 0
            node.committed.clear()
        node.lost = False
        self._apply(node, capacity, seq, now)

    def update(self, node_id: str, capacity: Capacity, *, seq: int, now: float) -> bool:
        """A node's push. False when it was older than the last one seen (ignored)."""
        node = self._get(node_id)
        if seq <= node.seq:
            return False
        node.lost = False
        self._apply(node, capacity, seq, now)
        return True

    def heartbeat(self, node_id: str, *, now: float) -> None:
        node = self._get(node_id)
        node.seen = now
        if node.lost:
            node.lost = False
            self._reindex(node)

    def drain(self, node_id: str, draining: bool = True) -> None:
        """A draining node gets nothing new; its sandboxes keep running."""
        node = self._get(node_id)
        if node.draining != draining:
            node.draining = draining
            self._reindex(node)

    def mark_lost(self, node_id: str) -> None:
        node = self._get(node_id)
        node.lost = True
        self._unindex(node)

    def remove(self, node_id: str) -> None:
        node = self._nodes.pop(node_id, None)
        if node is not None:
            self._unindex(node)
            del self._by_order[node.order]

    def sweep(self, now: float) -> list[str]:
        """Mark every node not heard from within ``stale_after`` lost; the ids newly lost. O(nodes): the
        controller's timer calls it, never the allocation path (which checks the time of its candidates)."""
        lost = [n.node_id for n in self._nodes.values() if not n.lost and now - n.seen > self.stale_after]
        for node_id in lost:
            self.mark_lost(node_id)
        return lost

    # ------------------------------------------------------------------ allocation

    def allocate(self, req: Request, *, now: float) -> Allocation:
        """Choose a node for ``req`` and reserve its resources there. Raises :class:`NoCapacityError` (saying
        why) when no node can take it."""
        key = (req.template, req.backend)
        oldest = now - self.stale_after
        index = self._index
        held = False
        for warm in (True, False):
            slot = (key, warm)
            idx = index.get(slot)
            if not idx:
                continue
            held = True
            node = idx.pick(slot, req, oldest, self._by_order)
            if node is not None:
                node.mem -= req.memory_mb
                node.cpu -= req.cpu_millis
                node.pending_mem += req.memory_mb
                node.pending_cpu += req.cpu_millis
                node.running += 1
                if warm:
                    node.warm[key] -= 1
                if self._eager:
                    self._move(node, slot)
                return Allocation(node.node_id, node.url, key, req.memory_mb, req.cpu_millis, warm)
        if not held:
            raise NoCapacityError(
                f"no node of the fleet holds template {req.template!r} for backend {req.backend!r}: "
                "build or import it on a node (branchbox template build), or check `branchbox fleet nodes`",
                template=req.template,
                backend=req.backend,
            )
        raise NoCapacityError(
            f"no node can take a sandbox of {req.memory_mb} MiB and {req.cpu_millis / 1000:g} CPU from "
            f"{req.template!r} ({req.backend})"
            + (f" with labels {dict(req.labels)}" if req.labels else "")
            + ": every node holding it is full, draining or unreachable (see `branchbox fleet nodes`)",
            template=req.template,
            backend=req.backend,
        )

    # ------------------------------------------------------------------ after the node answered

    def commit(self, alloc: Allocation, *, now: float, ident: str = "") -> None:
        """The node made the sandbox. Its pushes will count it, but one read before the create may still be on
        its way: the capacity stays taken for ``commit_grace`` seconds of pushes, then the pushes alone count.
        ``ident``: what a destroy of it will name (the sandbox's id, or its workspace's), for :meth:`forget`."""
        node = self._nodes.get(alloc.node_id)
        if node is not None:
            node.pending_mem = max(0, node.pending_mem - alloc.memory_mb)
            node.pending_cpu = max(0, node.pending_cpu - alloc.cpu_millis)
            node.committed.append((now, alloc.memory_mb, alloc.cpu_millis, ident))

    def forget(self, node_id: str, ident: str) -> bool:
        """The sandbox (or workspace) ``ident`` of the node is gone (destroyed through the controller): a commit
        still held for it gives its capacity back now instead of after ``commit_grace`` (a burst of short-lived
        sandboxes would otherwise look twice as big for that long). The node's next push is authoritative again.
        True when a hold was dropped."""
        node = self._nodes.get(node_id)
        if node is None or not ident:
            return False
        for i, held in enumerate(node.committed):
            if held[3] == ident:
                del node.committed[i]
                node.mem += held[1]
                node.cpu += held[2]
                node.running = max(0, node.running - 1)
                self._reindex(node)
                return True
        return False

    def release(self, alloc: Allocation) -> None:
        """The create failed: the reservation and its capacity come back (not a warm member: it may be used)."""
        node = self._nodes.get(alloc.node_id)
        if node is None:
            return
        node.pending_mem = max(0, node.pending_mem - alloc.memory_mb)
        node.pending_cpu = max(0, node.pending_cpu - alloc.cpu_millis)
        node.mem += alloc.memory_mb
        node.cpu += alloc.cpu_millis
        node.running = max(0, node.running - 1)
        self._reindex(node)

    # ------------------------------------------------------------------ reading

    def get(self, node_id: str) -> NodeView:
        return self._view(self._get(node_id))

    def list(self) -> list[NodeView]:
        view = self._view
        return [view(n) for n in self._nodes.values()]

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    # ------------------------------------------------------------------ internals

    def _get(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise NodeNotFoundError(f"no node {node_id!r} in the fleet: see `branchbox fleet nodes`")
        return node

    def _apply(self, node: _Node, cap: Capacity, seq: int, now: float) -> None:
        if cap.memory_mb < 0 or cap.cpu_millis < 0 or cap.running < 0:
            raise BadRequestError(f"node {node.node_id!r} pushed a negative capacity: {cap}")
        node.pushed = cap
        node.seq, node.seen = seq, now
        if node.committed:
            node.committed = [c for c in node.committed if now - c[0] <= self.commit_grace]
        held_mem = node.pending_mem + sum(c[1] for c in node.committed)
        held_cpu = node.pending_cpu + sum(c[2] for c in node.committed)
        # a push that already counts a committed create counts it twice for a moment: never below zero
        node.mem = max(0, cap.memory_mb - held_mem)
        node.cpu = max(0, cap.cpu_millis - held_cpu)
        node.running = cap.running
        node.warm = {k: n for k, n in cap.warm.items() if n > 0}
        node.held = cap.templates | node.warm.keys()
        self._reindex(node)

    def _reindex(self, node: _Node) -> None:
        """Put the node in every index it belongs to, at its current figures (out of all when it may not
        take anything)."""
        if node.draining or node.lost:
            self._unindex(node)
            return
        want = {(k, False) for k in node.held}
        want.update((k, True) for k, n in node.warm.items() if n > 0)
        for slot in [s for s in node.entries if s not in want]:
            self._index[slot].drop(node, slot)
        for slot in want:
            idx = self._index.get(slot)
            if idx is None:
                idx = self._index[slot] = self._make()
            idx.put(node, slot, self._by_order)

    def _move(self, node: _Node, picked: Slot) -> None:
        """pack, after an allocation lowered the node's free memory (and maybe its warm members of the picked
        key): re-placed at once in the index it was picked from, marked dirty in its others."""
        index = self._index
        for slot in node.entries:
            if slot != picked:
                index[slot].dirty.add(node)  # type: ignore[union-attr]  # pack: every index is a _PackIndex
        if picked[1] and node.warm.get(picked[0], 0) <= 0:
            index[picked].drop(node, picked)
        else:
            index[picked].put(node, picked, self._by_order)

    def _unindex(self, node: _Node) -> None:
        for slot in list(node.entries):
            self._index[slot].drop(node, slot)

    def _view(self, n: _Node) -> NodeView:
        return NodeView(
            n.node_id,
            n.url,
            n.labels,
            n.mem,
            n.cpu,
            n.running,
            {k: c for k, c in n.warm.items() if c > 0},
            n.held,
            n.draining,
            n.lost,
            n.seen,
            n.seq,
        )
