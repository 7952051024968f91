"""The fleet controller: the registry, fed by the node agents' pushes, and the node-loss detector.

Node agents push into an **inbox**, a small named Ray actor the controller owns (it goes when the controller
goes; agents look it up by name again). The controller drains it with one awaited actor call at a time (a long
poll: it answers as soon as a push is there, or after ``0.25`` s), so pushes reach the registry within one
actor round trip and the create path makes no Ray call at all: allocation is an in-process call on the registry.

A node is **lost** when (a) no push came for ``stale_after`` seconds (its daemon stopped answering its agent, or
the agent or its node died), or (b) Ray reports its node dead (the cluster's health checks: tune
``health_check_period_ms`` and ``health_check_failure_threshold`` on the head, docs/fleet.md). Its sandboxes then
answer ``sandbox_lost``. A push from a new agent incarnation (the daemon restarted and joined again), or from a
lost node that speaks again, brings it back: the controller then lists the node's sandboxes again (reconcile).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from branchbox.errors import NoCapacityError, SandboxLostError
from branchbox.fleet.node import INBOX, NAMESPACE
from branchbox.fleet.registry import Allocation, Capacity, NodeView, Policy, Registry, Request

log = structlog.get_logger("branchbox.fleet")


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    address: str
    """The Ray cluster (``HOST:PORT`` of its GCS, or ``auto``)."""
    policy: Policy = "spread"
    stale_after: float = 3.0
    """Seconds without a push before a node is lost (agents push every 0.5 s by default; a node whose Ray node
    dies is lost sooner, by Ray's health checks)."""
    placement_timeout: float = 10.0
    """How long a create waits for a node with room before it fails with ``no_capacity``."""
    default_backend: str = "container"
    health_period: float = 0.25


class Inbox:
    """The Ray actor node agents push to (made with ``ray.remote`` by the controller)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.event: asyncio.Event | None = None

    def _ev(self) -> asyncio.Event:
        if self.event is None:
            self.event = asyncio.Event()
        return self.event

    async def push(self, msg: dict[str, Any]) -> None:
        self.items.append(msg)
        self._ev().set()

    async def take(self, wait: float) -> list[dict[str, Any]]:
        ev = self._ev()
        if not self.items:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), wait)
        items, self.items = self.items, []
        ev.clear()
        return items


def capacity_from(data: dict[str, Any]) -> Capacity:
    return Capacity(
        memory_mb=int(data["memory_mb"]),
        cpu_millis=int(data["cpu_millis"]),
        running=int(data["running"]),
        templates=frozenset((str(t), str(b)) for t, b in data["templates"]),
        warm={(str(t), str(b)): int(n) for t, b, n in data["warm"]},
    )


class Controller:
    """Owns the :class:`Registry` and which node holds which sandbox and snapshot. One per fleet; every method
    runs on the controller's event loop."""

    def __init__(self, settings: ControllerSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = Registry(policy=settings.policy, stale_after=settings.stale_after)
        self.owners: dict[str, str] = {}  # sandbox id -> node
        self.snapshot_owners: dict[str, str] = {}  # snapshot id or name -> node
        self.workspace_owners: dict[str, str] = {}  # workspace id -> node
        self.owner_tables = {"sandboxes": self.owners, "snapshots": self.snapshot_owners,
                             "workspaces": self.workspace_owners}  # fmt: skip
        self.lost_why: dict[str, str] = {}
        self.incarnation: dict[str, str] = {}
        self.ray_node: dict[str, str] = {}
        self.changed = asyncio.Event()
        self.reconcile: Callable[[str], Coroutine[Any, Any, None]] | None = None  # set by the HTTP front
        # a node registered (new, or a new incarnation: its daemon restarted): the front configures its pools
        self.on_join: Callable[[str], Coroutine[Any, Any, None]] | None = None
        self._inbox: Any = None
        self._last_take = clock()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._connect)
        self._tasks = [asyncio.create_task(self._drain()), asyncio.create_task(self._health())]

    def _connect(self) -> None:
        import ray  # noqa: PLC0415 - the fleet extra

        if not ray.is_initialized():
            ray.init(
                address=self.settings.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                configure_logging=False,
                include_dashboard=False,
            )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._inbox = (
            ray.remote(Inbox)
            .options(
                name=INBOX,
                namespace=NAMESPACE,
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=1000,
                scheduling_strategy=here,  # on the controller's own node: it lives and dies with the controller
            )
            .remote()
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        import ray  # noqa: PLC0415

        with contextlib.suppress(Exception):
            ray.kill(self._inbox)
        await asyncio.get_running_loop().run_in_executor(None, ray.shutdown)

    async def _drain(self) -> None:
        while True:
            try:
                items = await self._inbox.take.remote(0.25)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fleet.inbox_failed", error=str(exc))
                await asyncio.sleep(0.5)
                await asyncio.get_running_loop().run_in_executor(None, self._connect)
                continue
            self._last_take = self.clock()
            for msg in items:
                try:
                    self.apply(msg)
                except Exception as exc:
                    log.warning("fleet.bad_push", node=msg.get("node"), error=str(exc))

    async def _health(self) -> None:
        import ray  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            await asyncio.sleep(self.settings.health_period)
            now = self.clock()
            # a silence the controller could not have heard (its own inbox call is late: a loaded host, a Ray
            # hiccup) is not the nodes' fault: no heartbeat verdict until the inbox answers again (Ray's is kept)
            if now - self._last_take <= 1.0:
                for node in self.registry.sweep(now):
                    self._lost(node, f"no heartbeat for {self.settings.stale_after:g} s (its daemon or agent stopped)")
            tick += 1
            if tick % 2:
                continue
            try:
                nodes = await loop.run_in_executor(None, ray.nodes)
            except Exception as exc:
                log.warning("fleet.ray_nodes_failed", error=str(exc))
                continue
            dead = {n["NodeID"] for n in nodes if not n.get("Alive")}
            for view in self.registry.list():
                if not view.lost and self.ray_node.get(view.node_id) in dead:
                    self.registry.mark_lost(view.node_id)
                    self._lost(view.node_id, "Ray reported its node dead")

    def _lost(self, node: str, why: str) -> None:
        self.lost_why[node] = why
        log.warning("fleet.node_lost", node=node, why=why)

    # ------------------------------------------------------------------ pushes

    def apply(self, msg: dict[str, Any]) -> None:
        node = str(msg["node"])
        now = self.clock()
        if msg.get("leave"):
            if node in self.registry and msg.get("incarnation") == self.incarnation.get(node):
                self.registry.mark_lost(node)
                self._lost(node, "it left the fleet (its daemon stopped)")
            return
        cap = capacity_from(msg["capacity"])
        seq = int(msg["seq"])
        if node not in self.registry or self.incarnation.get(node) != msg["incarnation"]:
            rejoin = node in self.registry
            self.registry.register(node, str(msg["url"]), cap, labels=msg.get("labels") or {}, seq=seq, now=now)
            self.incarnation[node] = str(msg["incarnation"])
            self.ray_node[node] = str(msg.get("ray_node_id", ""))
            self.lost_why.pop(node, None)
            log.info("fleet.node_joined", node=node, url=msg["url"], rejoin=rejoin)
            if rejoin:
                self._reconcile(node)
            if self.on_join is not None:
                self._tasks.append(asyncio.get_running_loop().create_task(self.on_join(node)))
        else:
            was_lost = node in self.lost_why
            if self.registry.update(node, cap, seq=seq, now=now) and was_lost:
                self.lost_why.pop(node, None)
                log.info("fleet.node_back", node=node)
                self._reconcile(node)
        self.changed.set()

    def _reconcile(self, node: str) -> None:
        for table in self.owner_tables.values():
            for ident in [i for i, n in table.items() if n == node]:
                del table[ident]
        if self.reconcile is not None:
            task = asyncio.get_running_loop().create_task(self.reconcile(node))
            self._tasks.append(task)

    # ------------------------------------------------------------------ placement

    async def place(self, req: Request, timeout: float) -> Allocation:
        """Allocate, waiting up to ``timeout`` seconds for a push that makes room (Ray would leave a request
        for absent resources pending forever: this one fails with ``no_capacity``)."""
        deadline = self.clock() + timeout
        while True:
            try:
                return self.registry.allocate(req, now=self.clock())
            except NoCapacityError as exc:
                left = deadline - self.clock()
                if left <= 0:
                    raise NoCapacityError(f"{exc.message}; waited {timeout:g} s for room", **exc.details) from None
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), left)

    # ------------------------------------------------------------------ reading

    def node_url(self, node: str) -> str:
        """The daemon URL of a live node; :class:`SandboxLostError` when it is lost."""
        if node in self.lost_why or node not in self.registry:
            why = self.lost_why.get(node, "it is no longer in the fleet")
            raise SandboxLostError(
                f"the sandbox was on node {node!r}, which the fleet lost: {why}. Its sandboxes are unreachable "
                "until the node rejoins; create a new sandbox (or restore a snapshot kept elsewhere)",
                node=node,
            )
        return self.registry.get(node).url

    def live_nodes(self) -> list[NodeView]:
        return [v for v in self.registry.list() if not v.lost]

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {
                "node": v.node_id,
                "url": v.url,
                "state": "lost" if v.lost else "draining" if v.draining else "ready",
                "lost_reason": self.lost_why.get(v.node_id),
                "labels": dict(v.labels),
                "memory_mb_free": v.memory_mb,
                "cpu_free": v.cpu_millis / 1000,
                "running": v.running,
                "warm": [{"template": t, "backend": b, "ready": n} for (t, b), n in sorted(v.warm.items())],
                "templates": sorted({t for t, _ in v.templates}),
                "seconds_since_push": round(now - v.last_seen, 3),
                "ray_node_id": self.ray_node.get(v.node_id, ""),
            }
            for v in self.registry.list()
        ]
