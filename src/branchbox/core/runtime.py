"""The core's state and its one owner.

A :class:`Runtime` holds everything the Manager's services share: the settings, the store, the storage driver,
the backends, the network, the live sandboxes, the warm pools and the event bus. Every state change of a sandbox
goes through it (:meth:`Runtime.set_state` writes the record and the in-memory copy together and counts the
states); the services (lifecycle, layers, snapshots, pools, network, sandbox calls, recovery) are stateless
beyond what they keep here. docs/architecture.md, "Layers"."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from branchbox.agentclient.client import AgentClient
from branchbox.backends.base import Backend, HostIdRanges, IdMap, SandboxHandle
from branchbox.backends.idranges import IdRanges
from branchbox.core import disk
from branchbox.core.events import EventBus, ManagerEvent
from branchbox.core.pool import Pool
from branchbox.core.settings import ManagerSettings
from branchbox.core.store import Store
from branchbox.errors import InvalidStateError, NotSupportedError, SandboxNotFoundError, SnapshotNotFoundError
from branchbox.images.store import TemplateStore
from branchbox.models import SandboxInfo, SandboxState, SnapshotInfo
from branchbox.net import Network
from branchbox.storage.base import StorageDriver

log = logging.getLogger("branchbox.manager")
ACTIVE = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)


def new_sandbox_id() -> str:
    """20 lowercase hex characters: safe in URLs, hostnames and cgroup names."""
    return secrets.token_hex(10)


def make_backend(kind: str, settings: ManagerSettings, ids: IdRanges | None = None) -> Backend:
    """The backend registry: kind -> backend, imported lazily so unused backends cost nothing."""
    if kind == "container":
        from branchbox.backends.container import ContainerBackend  # noqa: PLC0415 - lazy by design

        return ContainerBackend(
            settings.data_dir / "run",
            cgroup_parent=settings.cgroup_parent,
            idmap=settings.idmap,
            tmp_tmpfs_mb=settings.tmp_tmpfs_mb,
            ids=ids,
        )
    if kind == "microvm":
        from branchbox.backends.microvm import MicroVMBackend  # noqa: PLC0415 - lazy by design
        from branchbox.backends.microvm.config import config_from_env  # noqa: PLC0415

        return MicroVMBackend(config_from_env(settings.data_dir, cgroup_parent=settings.cgroup_parent))
    raise NotSupportedError(f"backend {kind!r} is not available here; use one of: container, microvm")


@dataclass(slots=True)
class Live:
    """In-memory state of a sandbox that has (or had) processes."""

    info: SandboxInfo
    handle: SandboxHandle
    agent: AgentClient
    backend: Backend
    watcher: asyncio.Task[None] | None = None
    expiry: asyncio.TimerHandle | None = None
    destroying: bool = False
    pooled: str | None = None  # template of the pool this member waits in (invisible to users)
    from_pool: str | None = None  # template of the pool this sandbox was claimed from
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Runtime:
    """The shared state of one Manager (see the module's docstring)."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        backends: Mapping[str, Backend] | None = None,
        storage: StorageDriver | str = "auto",
    ) -> None:
        self.settings = settings
        self.templates = TemplateStore(settings.template_root, settings.idmap)
        self.storage_choice = storage
        self.storage: StorageDriver | None = None
        self.reserve: disk.ReserveKeeper | None = None  # the sandboxes' group limit (core/disk.py)
        self.store: Store | None = None
        self.backends: dict[str, Backend] = dict(backends or {})
        self.live: dict[str, Live] = {}
        self.creating: set[str] = set()
        self.pools: dict[str, Pool[Live]] = {}
        self.layer_pools: dict[str, Pool[Live]] = {}  # one spare per hot layer chain (git workspaces), LRU order
        self.net: Network | None = None
        self.background: set[asyncio.Task[Any]] = set()
        self.events = EventBus()
        self.closed = False
        # per-sandbox uid ranges (issue 22.1): in use while a record or a layer names them (or a boot holds them)
        block = settings.uid_ranges
        self.ids = None if block is None else IdRanges(*block, in_use=lambda: self.db.id_ranges_in_use())  # noqa: PLW0108

    # ------------------------------------------------------------------ resources
    @property
    def db(self) -> Store:
        if self.store is None:
            raise InvalidStateError("the manager is not started: use `async with Manager.open(...)`")
        return self.store

    @property
    def driver(self) -> StorageDriver:
        if self.storage is None:
            raise InvalidStateError("the manager is not started: use `async with Manager.open(...)`")
        return self.storage

    def poke_reserve(self) -> None:
        if self.reserve is not None:
            self.reserve.poke()

    def disk_pressure(self) -> disk.Pressure:
        """The data dir's disk now (/metrics, /health); refreshes the sandboxes' group limit in the background."""
        self.poke_reserve()
        state = None if self.reserve is None else self.reserve.state
        return disk.pressure(self.settings.data_dir, self.settings.reserve_mb, state)

    async def backend(self, kind: str) -> Backend:
        be = self.backends.get(kind)
        if be is None:
            be = make_backend(kind, self.settings, self.ids)
            await be.start()
            self.backends[kind] = be
        return be

    def idmap_for(self, sid: str, be: Backend, *, existing: bool) -> IdMap:
        """The host uid range sandbox ``sid`` boots in: its own (kept across a reset), or the canonical one
        (backends without host uids, daemons without a uid block, records of older daemons)."""
        if existing and (rec := self.db.get(sid)) is not None:
            return IdMap(rec.uid_base, self.settings.idmap.count)
        if self.ids is not None and isinstance(be, HostIdRanges):
            return be.choose_idmap(sid)
        return self.settings.idmap

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.settings.data_dir / "sandboxes" / sandbox_id

    def layer_path(self, layer_id: str) -> Path:
        return self.settings.data_dir / "layers" / layer_id

    def lower_path(self, layer_id: str) -> Path:
        return self.driver.layer_lower(self.layer_path(layer_id))

    async def connect_agent(self, be: Backend, handle: SandboxHandle) -> AgentClient:
        return await AgentClient.connect(handle.agent_address, timeout=self.settings.agent_connect_timeout,
                                         open_session=be.capabilities.agent_session)  # fmt: skip

    def spawn_bg(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # ------------------------------------------------------------------ lookups
    def require(self, sandbox_id: str, *states: SandboxState) -> Live:
        live = self.live.get(sandbox_id)
        if live is not None and live.pooled is not None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
        if live is None or live.destroying:
            rec = None if live is not None else self.db.get(sandbox_id)
            if rec is None:
                raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
            raise InvalidStateError(
                f"sandbox {sandbox_id} is {rec.info.state.value}"
                + (f" ({rec.info.error})" if rec.info.error else "")
                + ": create a new sandbox",
                state=rec.info.state.value,
            )
        if live.info.state not in states:
            hint = "resume it first" if live.info.state is SandboxState.PAUSED else "wait until it is running"
            raise InvalidStateError(
                f"sandbox {sandbox_id} is {live.info.state.value}; this needs "
                f"{' or '.join(s.value for s in states)}: {hint}",
                state=live.info.state.value,
            )
        return live

    def snapshot_or_raise(self, id_or_name: str) -> SnapshotInfo:
        snap = self.db.get_snapshot(id_or_name)
        if snap is None:
            raise SnapshotNotFoundError(f"snapshot {id_or_name!r} does not exist: list them with list_snapshots()")
        return snap

    def pool_key(self, template: str, backend: str | None) -> str:
        """The name a pool is known by (in the store and logs): its template's, plus ``@backend`` for a backend
        other than the default."""
        kind = backend or self.settings.default_backend
        return template if kind == self.settings.default_backend else f"{template}@{kind}"

    def pool_named(self, name: str | None) -> Pool[Live] | None:
        if name is None:
            return None
        return self.pools.get(name) or self.layer_pools.get(name)

    # ------------------------------------------------------------------ state changes and their events
    def set_state(self, live: Live, state: SandboxState, error: str | None = None) -> SandboxInfo:
        live.info = replace(live.info, state=state, error=error)
        self.db.update(live.info.id, state=state, error=error)
        self.emit_counts()
        return live.info

    def cancel_timers(self, live: Live, *, watcher: bool = True) -> None:
        if live.expiry is not None:
            live.expiry.cancel()
            live.expiry = None
        if watcher and live.watcher is not None and live.watcher is not asyncio.current_task():
            live.watcher.cancel()

    def emit(self, ev: ManagerEvent) -> None:
        self.events.emit(ev)

    def emit_counts(self) -> None:
        if self.events.wanted("state"):
            self.emit(ManagerEvent("state", counts=self.state_counts()))

    def state_counts(self) -> dict[str, int]:
        """Sandboxes by state, as ``Manager.list`` shows them (every state present; warm pool members not counted:
        they are no one's yet). A dead sandbox (error, stopped) is no longer live but its record is kept for
        inspection until it is destroyed: it is counted from the store."""
        counts = {s.value: 0 for s in SandboxState}
        for live in self.live.values():
            if live.pooled is None:
                counts[live.info.state.value] += 1
        counts[SandboxState.CREATING.value] += len(self.creating)
        for sid, state in self.db.states():
            if sid not in self.live and sid not in self.creating:
                counts[state.value] += 1
        return counts
