"""The Manager: the only code that changes sandbox state.

Every control-plane operation is one method here; HTTP, CLI and SDK only translate to and from these calls.
Allowed states per command (anything else raises InvalidStateError, code ``invalid_state``):

=====================  ===========================
command                allowed in state
=====================  ===========================
create                 (new)
get, list              any
exec, spawn, attach,   running
files, processes
pause                  running
resume                 paused
set_timeout            running, paused
destroy                any but destroyed
snapshot, fork         running, paused (frozen while capturing, then left as it was)
reset                  running, paused (comes back running)
get_network,           running, paused (docs/networking.md)
update_network
create(snapshot=)      (new); list/get/delete_snapshot: any
=====================  ===========================

Snapshots, restores and forks (container backend: filesystem only, running processes are not copied) are
described in docs/snapshots.md. Git workspaces (``Manager.workspaces``: create, get, list, delete) are sandboxes
booted on cached commit layers (``create_on_layers``), described in docs/workspaces.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from branchbox.agent.client import AgentClient, ProcessHandle
from branchbox.backends.base import Backend, BootSpec, HostIdRanges, IdMap, MemorySnapshots, SandboxHandle
from branchbox.backends.idranges import IdRanges
from branchbox.core import disk, identity, validate
from branchbox.core import snapshots as snaps
from branchbox.core.events import ManagerEvent, Subscriber
from branchbox.core.limits import DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_PIDS
from branchbox.core.liveness import Watchdog, is_stopped
from branchbox.core.models import (
    ArchiveResult,
    ExecResult,
    FileEntry,
    ProcessInfo,
    Resources,
    SandboxInfo,
    SandboxState,
    SnapshotInfo,
    TemplateInfo,
)
from branchbox.core.pool import REFILL_DELAY_S, Pool, PoolConfig, PoolStats
from branchbox.core.settings import ManagerSettings
from branchbox.core.store import LayerRecord, Store
from branchbox.core.timing import PhaseTimer
from branchbox.errors import (
    AgentDisconnectedError,
    BackendError,
    BranchboxError,
    ConflictError,
    InvalidStateError,
    LimitExceededError,
    NotFoundError,
    NotSupportedError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
)
from branchbox.images.store import TemplateStore
from branchbox.net import Attachment, Network, NetworkPolicy
from branchbox.storage.base import SandboxDirs, StorageDriver
from branchbox.storage.fsutil import disk_usage_niced
from branchbox.storage.select import make_driver

log = logging.getLogger("branchbox.manager")
MEASURE_QUIET_S = 0.5  # layer sizes are measured once no snapshot was taken for this long

OutputCallback = Callable[[bytes], object]
_T = TypeVar("_T")
_ACTIVE = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
EXIT_GRACE_S = 2.0  # a lost agent connection waits this long for the init's exit before it is called a disconnect
LAYER_POOLS = 4  # chains of layers (hot git commits) that keep one spare sandbox booted


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


@dataclass(frozen=True, slots=True)
class _Subscription:
    fn: Subscriber
    kinds: frozenset[str] | None  # None: every kind

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


@dataclass(slots=True)
class _Live:
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


def _image_user(tpl: TemplateInfo) -> str | None:
    """An imported image's or a Dockerfile's USER, the default user of its sandboxes' commands (None: root)."""
    return tpl.user if tpl.source in ("image", "dockerfile") and tpl.user not in ("root", "0") else None


class Manager:
    """In-process core. Use ``async with Manager.open(settings) as m``."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        backends: Mapping[str, Backend] | None = None,
        storage: StorageDriver | str = "auto",
    ) -> None:
        self.settings = settings
        self._storage_choice = storage
        self._storage: StorageDriver | None = None
        self._reserve: disk.ReserveKeeper | None = None  # the sandboxes' group limit (core/disk.py)
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_again = False
        self.templates = TemplateStore(settings.template_root, settings.idmap)
        self._backends: dict[str, Backend] = dict(backends or {})
        self._store: Store | None = None
        self._live: dict[str, _Live] = {}
        self._creating: set[str] = set()
        self._subscribers: list[_Subscription] = []
        self._events: list[ManagerEvent] = []  # emitted, handed to the subscribers at the end of the loop's turn
        self._pools: dict[str, Pool[_Live]] = {}
        self._net: Network | None = None
        self._layer_pools: dict[str, Pool[_Live]] = {}  # one spare per hot layer chain (git workspaces), LRU order
        self._background: set[asyncio.Task[Any]] = set()
        self._measuring = asyncio.Lock()  # one layer measurement at a time ...
        self._last_capture = 0.0  # ... and none until captures have paused for MEASURE_QUIET_S
        self._closed = False
        self._liveness = Watchdog(self._check_agents)  # runs while agent calls are open (core/liveness.py)
        # per-sandbox uid ranges (issue 22.1): in use while a record or a layer names them (or a boot holds them)
        block = settings.uid_ranges
        self._ids = None if block is None else IdRanges(*block, in_use=lambda: self._db.id_ranges_in_use())  # noqa: PLW0108
        from branchbox.workspaces.service import WorkspaceService  # noqa: PLC0415 - the git cache is optional

        self.workspaces = WorkspaceService(self)  # git workspaces: docs/workspaces.md

    # ------------------------------------------------------------------ lifecycle of the Manager
    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: ManagerSettings | Path | str | None = None) -> AsyncIterator[Manager]:
        if settings is None:
            settings = ManagerSettings()
        elif not isinstance(settings, ManagerSettings):
            settings = ManagerSettings(data_dir=Path(settings))
        m = cls(settings)
        try:
            await m.start()  # a failed start (bad pool config, ...) still releases what it made
            yield m
        finally:
            await m.aclose()

    async def start(self) -> None:
        s = self.settings
        # private: state, uppers and layers hold sandboxes' files (setuid ones of the sandbox uid range too); the
        # zygote passes layers to sandboxes as open fds, QEMU sees its files through its jail
        for d in (s.data_dir, s.data_dir / "sandboxes", s.data_dir / "layers"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        choice = self._storage_choice
        self._storage = make_driver(choice, s.data_dir) if isinstance(choice, str) else choice
        self._reserve = disk.ReserveKeeper(self._storage.keep_free, s.reserve_mb)
        try:
            await asyncio.to_thread(self._reserve.refresh_now)
        except OSError as exc:
            log.warning("keeping the disk reserve failed: %s", exc)
        self._store = Store(s.data_dir / "state.db")
        await self._backend(s.default_backend)
        if s.network is not None:
            self._net = Network(s.network)
            await self._net.start()
        for cfg in s.pools:
            self.templates.get(cfg.template)  # a pool of an unknown template or backend is a configuration error
            key, resolved = await self._resolve_pool(cfg)
            self._pools[key] = Pool(resolved, self._boot_member)
        await self._reconcile()
        await self.workspaces.start()
        for pool in self._pools.values():
            pool.start()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._liveness.aclose()
        if self._reserve is not None:
            await self._reserve.aclose()
        await self.workspaces.aclose()
        for pool in [*self._layer_pools.values(), *self._pools.values()]:
            await pool.aclose()  # ready members stay running and re-join their pool on the next start
        if not self.settings.keep_sandboxes_on_shutdown:
            await asyncio.gather(*(self._destroy(sid) for sid in list(self._live)), return_exceptions=True)
        for live in list(self._live.values()):
            self._cancel_timers(live)
            await live.agent.aclose()
        self._live.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._net is not None:
            await self._net.aclose()
        for b in self._backends.values():
            await b.aclose()
        if self._store is not None:
            self._store.close()

    def subscribe(self, fn: Subscriber, *, kinds: Collection[str] | None = None) -> None:
        """Call ``fn`` with each event of ``kinds`` (default: every kind), soon after it happened
        (:mod:`branchbox.core.events`). Sandboxes are counted by state for ``state`` events only when a subscriber
        wants them."""
        self._subscribers.append(_Subscription(fn, None if kinds is None else frozenset(kinds)))

    # ------------------------------------------------------------------ sandbox lifecycle commands
    async def create(
        self,
        *,
        template: str = "default",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cpu: float = DEFAULT_CPU,
        memory_mb: int = DEFAULT_MEMORY_MB,
        pids: int = DEFAULT_PIDS,
        disk_mb: int | None = None,
        metadata: Mapping[str, str] | None = None,
        backend: str | None = None,
        hostname: str | None = None,
        snapshot: str | None = None,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
    ) -> SandboxInfo:
        """Create a sandbox from a template (or restore ``snapshot``: its template wins) and return it running.

        ``allow_internet_access`` (default True) and ``network`` (``allow_out``/``deny_out`` lists) set its egress
        policy (docs/networking.md). ``disk_mb`` limits its writable layer (default: the daemon's
        ``default_disk_mb``; core/disk.py). Bad input changes nothing."""
        timer = PhaseTimer()
        kind = backend or self.settings.default_backend
        try:
            with timer.phase("validate"):
                env_, meta, ttl = self._check_create_input(env, metadata, timeout, cpu, memory_mb, pids)
                if hostname is not None:
                    validate.hostname(hostname)
                if snapshot is not None:
                    snap = self._snapshot_or_raise(snapshot)
                    template = snap.template_digest
                tpl = self.templates.get(template)
                be = await self._backend(kind)
                disk_mb = self._disk_mb(disk_mb, be, None if snapshot is None else self._db.snapshot_disk_mb(snap.id))
                policy = self._policy_for(be, allow_internet_access, network)
                disk.check_reserve(self.settings.data_dir, self.settings.reserve_mb, "create")
                if snapshot is not None:
                    snap = self._snapshot_or_raise(snapshot)  # again: it may have been deleted meanwhile
        except BranchboxError as exc:
            self._emit(ManagerEvent("error", code=exc.code, operation="create"))
            raise
        if snapshot is not None:
            res = Resources(cpu=float(cpu), memory_mb=memory_mb, pids=pids, disk_mb=disk_mb)
            info = replace(self._new_info(tpl, kind, res, env_, meta, ttl, hostname), source="snapshot")
            return await self._restore(info, tpl, be, snap.layers, timer, policy=policy)
        pool = self._pools.get(self._pool_key(tpl.name, kind))
        if pool is not None and pool.config.matches(cpu, memory_mb, pids):
            member = pool.take()
            if member is not None:
                try:
                    return await self._claim(member, pool, env_, meta, ttl, hostname, timer, policy, disk_mb=disk_mb)
                except BranchboxError as exc:  # a broken member: drop it, fall back to a cold create
                    log.warning("pool %s: claim of %s failed (%s)", tpl.name, member.info.id, exc)
                    self._spawn_bg(self._destroy(member.info.id))
        res = Resources(cpu=float(cpu), memory_mb=memory_mb, pids=pids, disk_mb=disk_mb)
        info = self._new_info(tpl, kind, res, env_, meta, ttl, hostname)
        try:
            live = await self._boot_live(info, tpl, be, timer, policy=policy)
        except BaseException as exc:
            code = exc.code if isinstance(exc, BranchboxError) else "internal"
            self._emit(ManagerEvent("create", info.id, kind, "cold", "error", timer.total_ms / 1e3, code=code))
            self._emit(ManagerEvent("error", info.id, code=code, operation="create"))
            raise
        self._schedule_expiry(live)
        log.debug("created sandbox %s timings=%s", info.id, live.info.timings, extra={"sandbox_id": info.id})
        self._emit(ManagerEvent("create", info.id, kind, "cold", "ok", timer.total_ms / 1e3, timings=live.info.timings))
        self._emit_counts()
        return live.info

    def _check_create_input(
        self,
        env: Mapping[str, str] | None,
        metadata: Mapping[str, str] | None,
        timeout: float | None,
        cpu: float,
        memory_mb: int,
        pids: int,
    ) -> tuple[dict[str, str], dict[str, str], float | None]:
        """What every create checks before it changes anything: (env, metadata, TTL), or a typed error."""
        env_ = validate.env(env)
        meta = validate.metadata(metadata)
        ttl = validate.timeout(timeout, default=self.settings.default_timeout, maximum=self.settings.max_timeout)
        validate.resources(cpu, memory_mb, pids)
        if len(self._live) + len(self._creating) >= self.settings.max_sandboxes:
            raise LimitExceededError(
                f"{self.settings.max_sandboxes} sandboxes exist already: destroy some or raise max_sandboxes"
            )
        return env_, meta, ttl

    def _disk_mb(self, requested: int | None, be: Backend, inherited: int | None = None) -> int:
        """A new sandbox's disk limit (core/disk.py): ``requested``, else ``inherited`` (a restore: the snapshot's
        source had it), else the default; 0 where nothing limits it."""
        return disk.resolve(requested, default=self.settings.default_disk_mb, enforcer=self._driver.disk_limits,
                            vm=be.capabilities.memory_snapshot, inherited=inherited)  # fmt: skip

    def _poke_reserve(self) -> None:
        if self._reserve is not None:
            self._reserve.poke()

    def disk_pressure(self) -> disk.Pressure:
        """The data dir's disk now (/metrics, /health); refreshes the sandboxes' group limit in the background."""
        self._poke_reserve()
        state = None if self._reserve is None else self._reserve.state
        return disk.pressure(self.settings.data_dir, self.settings.reserve_mb, state)

    def _new_info(
        self,
        tpl: TemplateInfo,
        kind: str,
        resources: Resources,
        env: Mapping[str, str],
        metadata: Mapping[str, str],
        ttl: float | None,
        hostname: str | None,
    ) -> SandboxInfo:
        sid = new_sandbox_id()
        now = time.time()
        return SandboxInfo(
            id=sid,
            template=tpl.name,
            template_digest=tpl.digest,
            backend=kind,
            state=SandboxState.CREATING,
            created_at=now,
            expires_at=None if ttl is None else now + ttl,
            resources=resources,
            metadata=dict(metadata),
            env=dict(env),
            hostname=hostname or f"bb-{sid[:12]}",
            source="cold",
        )

    async def _boot_live(
        self,
        info: SandboxInfo,
        tpl: TemplateInfo,
        be: Backend,
        timer: PhaseTimer,
        *,
        pool: str | None = None,
        lowers: Sequence[str] = (),
        base: str | None = None,
        fresh_machine_id: bool = False,
        existing: bool = False,
        memory: str | None = None,
        policy: NetworkPolicy | None = None,
        idmap: IdMap | None = None,
    ) -> _Live:
        """Boot a sandbox for ``info`` and register it (running, watched). On failure nothing is left.

        ``lowers``: layer ids stacked above the template (topmost first); ``base``: a layer the upper starts as
        a clone of (drivers that clone); ``existing``: the record exists already (reset); ``memory``: a memory
        snapshot layer to continue from (backends with memory snapshots); ``policy``: its network policy (None: the
        default when networking is on)."""
        sid = info.id
        self._creating.add(sid)
        handle: SandboxHandle | None = None
        try:
            with timer.phase("store"):
                idmap = idmap or self._idmap_for(sid, be, existing=existing)
                pinned = [base, *lowers] if base is not None else list(lowers)  # nothing frees them meanwhile
                if existing:
                    self._db.update(sid, state=info.state, layers=pinned, handle=None, error=None)
                else:
                    self._db.insert(info, pool=pool, layers=pinned, uid_base=idmap.host_base)
                lower_paths = [self._lower_path(lid) for lid in lowers]
                bases = [*self._db.layer_uid_bases(lowers), self.settings.idmap.host_base]  # the template's last
                base_path = None if base is None else self._layer_path(base)
            with timer.phase("dirs"):
                root = self.templates.rootfs(tpl.digest)
                dirs = await self._prepare_dirs(sid, base_path, [*lower_paths, root], fresh_machine_id,
                                                info.resources.disk_mb, idmap, bases)  # fmt: skip
                self._poke_reserve()  # the group's limit follows the free space, in the background
            spec = BootSpec(
                sandbox_id=sid,
                layers=[*lower_paths, root],
                upper_dir=dirs.upper,
                work_dir=dirs.work,
                run_dir=dirs.run,
                hostname=info.hostname,
                resources=info.resources,
                env={**tpl.env, **info.env},
                workdir=tpl.workdir,
                idmap=idmap,
                layer_bases=bases,
                network=self._net is not None and be.capabilities.network,
                background=pool is not None,
                memory_snapshot=None if memory is None else self._layer_path(memory),
            )
            handle = await be.boot(spec, timer)
            if spec.network:
                handle, agent = await self._wire_and_connect(be, handle, policy or NetworkPolicy(), timer)
            else:
                with timer.phase("agent_connect"):
                    agent = await self._connect_agent(be, handle)
            user = _image_user(tpl)
            if be.capabilities.agent_session:
                with timer.phase("identity"):
                    await identity.personalise(
                        agent, hostname=info.hostname, env=spec.env, workdir=spec.workdir, user=user
                    )
            elif user is not None:
                await agent.configure(env=spec.env, workdir=spec.workdir, user=user)
            info = replace(info, state=SandboxState.RUNNING, timings=timer.as_dict())
            if base is not None:  # the upper is a clone of base now: only the lowers are used
                self._db.update(sid, state=info.state, handle=handle, timings=info.timings, layers=list(lowers))
            else:
                self._db.update(sid, state=info.state, handle=handle, timings=info.timings)
        except BaseException:
            self._creating.discard(sid)
            await self._cleanup(sid, info.backend, handle)
            with contextlib.suppress(Exception):
                self._forget(sid)
            raise
        self._creating.discard(sid)
        live = _Live(info=info, handle=handle, agent=agent, backend=be, pooled=pool)
        self._live[sid] = live
        self._watch(live)
        return live

    async def _claim(
        self,
        live: _Live,
        pool: Pool[_Live],
        env: Mapping[str, str],
        metadata: Mapping[str, str],
        ttl: float | None,
        hostname: str | None,
        timer: PhaseTimer,
        policy: NetworkPolicy | None = None,
        pool_name: str | None = None,
        *,
        disk_mb: int | None = None,
    ) -> SandboxInfo:
        """The fast path: personalise a ready pool member in at most one agent round trip."""
        with timer.phase("claim"):
            live.backend.foreground(live.handle)
            if disk_mb is not None and disk_mb != live.info.resources.disk_mb:  # members wait with the default
                self._driver.set_disk_limit(self._sandbox_dir(live.info.id), disk_mb)  # one ioctl, no commit
                live.info = replace(live.info, resources=replace(live.info.resources, disk_mb=disk_mb))
                self._db.update(live.info.id, resources=live.info.resources)
            if policy is not None and self._net is not None:  # members wait with the default policy
                self._set_policy(live, policy)
            rename = hostname is not None and hostname != live.info.hostname
            session = live.backend.capabilities.agent_session
            calls: builtins.list[Awaitable[Any]] = []  # at most one round trip: the agent answers them together
            if env:
                tpl = self.templates.get(live.info.template_digest)
                calls.append(live.agent.configure(env={**(tpl.env if session else {}), **env}, user=_image_user(tpl)))
            if rename and hostname is not None:
                if not session:  # a container: renamed from outside (its agent has no CAP_SYS_ADMIN)
                    live.backend.set_hostname(live.handle, hostname)
                calls.append(live.agent.identity(hostname=hostname))  # and /etc/hosts, /etc/hostname
            await asyncio.gather(*calls)
        now = time.time()
        with timer.phase("store"):
            live.info = replace(
                live.info,
                created_at=now,
                expires_at=None if ttl is None else now + ttl,
                metadata=dict(metadata),
                env=dict(env),
                hostname=hostname or live.info.hostname,
                source="warm",
                timings=timer.as_dict(),
            )
            live.pooled = None
            live.from_pool = pool_name or self._pool_key(pool.config.template, pool.config.backend)
            i = live.info
            self._db.update(i.id, pool=None, created_at=i.created_at, expires_at=i.expires_at, metadata=i.metadata,
                            env=i.env, hostname=i.hostname, source=i.source, timings=i.timings,
                            handle=live.handle)  # fmt: skip
        self._schedule_expiry(live)
        pool.record_claim(timer.total_ms)
        self._emit(ManagerEvent("create", i.id, i.backend, "warm", "ok", timer.total_ms / 1e3, timings=i.timings))
        self._emit_counts()
        return live.info

    async def get(self, sandbox_id: str) -> SandboxInfo:
        live = self._live.get(sandbox_id)
        if live is not None and live.pooled is None:
            return live.info
        rec = None if live is not None else self._db.get(sandbox_id)
        if rec is None or rec.pool is not None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
        return rec.info

    async def list(
        self, *, metadata: Mapping[str, str] | None = None, states: Collection[SandboxState] | None = None
    ) -> builtins.list[SandboxInfo]:
        out = []
        for rec in self._db.all():
            live = self._live.get(rec.info.id)
            if (live.pooled if live is not None else rec.pool) is not None:
                continue  # warm pool members are not sandboxes of any user yet
            info = live.info if live is not None else rec.info
            if states is not None and info.state not in states:
                continue
            if metadata and any(info.metadata.get(k) != v for k, v in metadata.items()):
                continue
            out.append(info)
        return out

    async def set_timeout(self, sandbox_id: str, timeout: float | None) -> SandboxInfo:
        """Reset the sandbox's time to live to ``timeout`` seconds from now (None: the default)."""
        live = self._require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        ttl = validate.timeout(timeout, default=self.settings.default_timeout, maximum=self.settings.max_timeout)
        expires = None if ttl is None else time.time() + ttl
        self._db.update(sandbox_id, expires_at=expires)
        live.info = replace(live.info, expires_at=expires)
        self._schedule_expiry(live)
        return live.info

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        if not live.backend.capabilities.pause:
            raise NotSupportedError(f"backend {live.backend.name} cannot pause sandboxes")
        async with live.lock:
            await live.backend.pause(live.handle)
            return self._set_state(live, SandboxState.PAUSED)

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        live = self._require(sandbox_id, SandboxState.PAUSED)
        async with live.lock:
            await live.backend.resume(live.handle)
            return self._set_state(live, SandboxState.RUNNING)

    async def destroy(self, sandbox_id: str) -> None:
        """Kill the sandbox and remove everything it used. Destroying a destroyed sandbox is not_found."""
        t0 = time.perf_counter()
        live = self._live.get(sandbox_id)
        if live is not None and live.pooled is not None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
        if live is None:
            rec = self._db.get(sandbox_id)
            if rec is None or rec.pool is not None:
                raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
            # a dead sandbox (state error/stopped) whose record is kept for inspection
            await self._cleanup(sandbox_id, rec.info.backend, rec.handle)
            self._forget(sandbox_id)
            return
        await self._destroy(sandbox_id)
        self._emit(ManagerEvent("destroy", sandbox_id, live.info.backend, seconds=time.perf_counter() - t0))

    async def _destroy(self, sandbox_id: str) -> None:
        live = self._live.get(sandbox_id)
        if live is None or live.destroying:
            return
        live.destroying = True
        self._cancel_timers(live)
        await live.agent.aclose()
        try:
            await self._cleanup(sandbox_id, live.info.backend, live.handle)
        finally:
            self._live.pop(sandbox_id, None)
            self._forget(sandbox_id)
            self._emit_counts()
            pool = self._pool_named(live.from_pool)
            if pool is not None:
                # golden reset: nothing of the released sandbox is kept (processes, upper layer, /tmp, env);
                # the pool refills with a pristine member right away
                pool.released(recycled=pool.config.reuse)

    # ------------------------------------------------------------------ operations inside a sandbox
    async def exec(
        self,
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command to its exit. The result keeps at most ``max_output`` bytes of each stream (never more
        than the ``max_output_bytes`` setting); the rest is drained, given to the callbacks and dropped, and the
        result says ``stdout_truncated`` / ``stderr_truncated``."""
        live = self._require(sandbox_id, SandboxState.RUNNING)
        validate.command(cmd)
        validate.stdin(stdin)
        env_ = validate.env(env)
        limit = self.settings.max_output_bytes
        if max_output is not None:
            limit = min(limit, max(0, max_output))
        t0 = time.perf_counter()
        outcome = "error"
        try:
            res = await self._agent_call(
                live,
                live.agent.exec(
                    cmd, env=env_, cwd=cwd, user=user, stdin=stdin, timeout=timeout,
                    on_stdout=on_stdout, on_stderr=on_stderr, max_output=limit,
                ),
            )  # fmt: skip
            outcome = "ok"
            return res
        finally:
            self._emit(ManagerEvent("exec", sandbox_id, live.info.backend, outcome=outcome,
                                    seconds=time.perf_counter() - t0))  # fmt: skip

    async def spawn(
        self,
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        timeout: float | None = None,
    ) -> ProcessHandle:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        validate.command(cmd)
        env_ = validate.env(env)
        return await self._agent_call(
            live, live.agent.spawn(cmd, env=env_, cwd=cwd, user=user, tag=tag, stdin=stdin, pty=pty, timeout=timeout)
        )

    async def attach(self, sandbox_id: str, pid: int) -> ProcessHandle:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.attach(pid))

    async def list_processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.list_processes())

    async def kill_process(self, sandbox_id: str, pid: int, signal: int = 9) -> None:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        await self._agent_call(live, live.agent.kill(pid, signal))

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.read_file(path))

    def download(self, sandbox_id: str, path: str, *, max_size: int | None = None) -> AsyncIterator[bytes]:
        """Stream a file out of the sandbox in chunks (bounded memory); a file over ``max_size`` bytes fails with
        PayloadTooLargeError before any byte."""
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return self._stream_out(live, live.agent.download(path, max_size=max_size))

    def download_archive(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        """Stream a tar of a sandbox path: a directory's contents (names relative to it), or one file."""
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return self._stream_out(live, live.agent.download_archive(path))

    async def _stream_out(self, live: _Live, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self._liveness.kick()
        try:
            async for chunk in chunks:
                yield chunk
        except AgentDisconnectedError as exc:
            raise await self._disconnected(live) from exc

    async def write_file(self, sandbox_id: str, path: str, data: bytes, *, mode: int | None = None) -> FileEntry:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.write_file(path, data, mode=mode))

    async def upload(
        self, sandbox_id: str, path: str, chunks: AsyncIterable[bytes], *, mode: int | None = None
    ) -> FileEntry:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.upload(path, chunks, mode=mode))

    async def upload_archive(self, sandbox_id: str, path: str, chunks: AsyncIterable[bytes]) -> ArchiveResult:
        """Unpack a tar stream into the sandbox directory ``path`` (created with its parents)."""
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.upload_archive(path, chunks))

    async def list_files(self, sandbox_id: str, path: str, *, depth: int = 1) -> builtins.list[FileEntry]:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.list_dir(path, depth=depth))

    async def stat(self, sandbox_id: str, path: str) -> FileEntry:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.stat(path))

    async def mkdir(self, sandbox_id: str, path: str) -> FileEntry:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.mkdir(path))

    async def remove(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        await self._agent_call(live, live.agent.remove(path, recursive=recursive))

    async def rename(self, sandbox_id: str, src: str, dst: str) -> FileEntry:
        live = self._require(sandbox_id, SandboxState.RUNNING)
        return await self._agent_call(live, live.agent.rename(src, dst))

    # ------------------------------------------------------------------ snapshots, restores, forks, reset
    async def snapshot(self, sandbox_id: str, *, name: str | None = None) -> SnapshotInfo:
        """Capture the sandbox's files as an immutable, durable snapshot. The sandbox keeps running."""
        timer = PhaseTimer()
        name = snaps.snapshot_name(name)
        live = self._require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        if name is not None and self._db.get_snapshot(name, hidden=True) is not None:
            raise ConflictError(f"a snapshot named {name!r} exists already: pick another name or delete it first")
        disk.check_reserve(self.settings.data_dir, self.settings.reserve_mb, "snapshot")
        disk.check_snapshot_budget(self._db.snapshot_bytes(), self.settings.snapshot_budget_mb)
        self._poke_reserve()
        snap = await self._capture(live, name, timer, hidden=False)
        self._emit(ManagerEvent("snapshot", sandbox_id, live.info.backend, seconds=timer.total_ms / 1e3,
                                timings=snap.timings))  # fmt: skip
        return snap

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return self._db.snapshots()

    async def get_snapshot(self, id_or_name: str) -> SnapshotInfo:
        return self._snapshot_or_raise(id_or_name)

    async def delete_snapshot(self, id_or_name: str) -> None:
        """Delete a snapshot; its layers go once no other snapshot or sandbox uses them (children keep theirs)."""
        snap = self._snapshot_or_raise(id_or_name)
        with self._db.durable():
            self._db.delete_snapshot(snap.id)
        self._schedule_gc()

    async def fork(self, sandbox_id: str, count: int = 1) -> builtins.list[SandboxInfo | BranchboxError]:
        """``count`` new sandboxes continuing from the sandbox's current files (not its processes).

        Returns one result per child, in order: its SandboxInfo or the error that child met."""
        timer = PhaseTimer()
        live = self._require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        if not live.backend.capabilities.fork:
            raise NotSupportedError(f"backend {live.backend.name} cannot fork sandboxes")
        snaps.fork_count(count, self.settings.max_sandboxes - len(self._live) - len(self._creating))
        disk.check_reserve(self.settings.data_dir, self.settings.reserve_mb, "fork")
        if self._ids is not None and isinstance(live.backend, HostIdRanges):
            rec = self._db.get(sandbox_id)  # the children's idmappings of its range, made during the capture
            ahead = live.backend.prepare_idmaps(rec.uid_base, count) if rec is not None else None
            if ahead is not None:
                self._background.add(ahead)
                ahead.add_done_callback(self._background.discard)
        snap = await self._capture(live, None, timer, hidden=True)
        snap_ms = timer.total_ms
        parent = live.info
        ttl = validate.timeout(None, default=self.settings.default_timeout, maximum=self.settings.max_timeout)
        attached = self._net.find(sandbox_id) if self._net is not None else None
        policy = attached.policy if attached is not None else None

        async def child() -> SandboxInfo:
            t = PhaseTimer()
            t.add("snapshot", snap_ms)
            tpl = self.templates.get(snap.template_digest)
            info = replace(
                self._new_info(tpl, parent.backend, parent.resources, parent.env, parent.metadata, ttl, None),
                source="fork",
            )
            return await self._restore(info, tpl, live.backend, snap.layers, t, stack=True, policy=policy)

        try:
            results = await asyncio.gather(*(child() for _ in range(count)), return_exceptions=True)
        finally:
            self._db.delete_snapshot(snap.id)  # the children's records keep the layers they use
            self._schedule_gc()
        out: builtins.list[SandboxInfo | BranchboxError] = []
        for r in results:
            if isinstance(r, BranchboxError | SandboxInfo):
                out.append(r)
            elif isinstance(r, asyncio.CancelledError):
                raise r
            else:
                out.append(BackendError(f"fork child of {sandbox_id} failed: {r!r}"))
        ok = sum(isinstance(r, SandboxInfo) for r in out)
        self._emit(ManagerEvent("fork", sandbox_id, parent.backend, outcome="ok" if ok == count else "error",
                                seconds=timer.total_ms / 1e3))  # fmt: skip
        return out

    async def reset(self, sandbox_id: str, snapshot: str | None = None) -> SandboxInfo:
        """Back to its template (or to ``snapshot``), keeping id, hostname, env, metadata and TTL.

        Processes, the upper layer and /tmp are discarded and the sandbox boots again; it comes back running.
        If that boot fails the sandbox is gone (its record is removed) and the error is raised."""
        timer = PhaseTimer()
        live = self._require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        snap = None if snapshot is None else self._snapshot_or_raise(snapshot)
        tpl = self.templates.get(snap.template_digest if snap is not None else live.info.template_digest)
        async with live.lock:
            if live.destroying:
                raise InvalidStateError(f"sandbox {sandbox_id} is being destroyed", state=live.info.state.value)
            live.destroying = True
            self._cancel_timers(live)
            self._creating.add(sandbox_id)
            # pin the chain to boot on in the record now: nothing can free those layers during the teardown
            chain = list(snap.layers) if snap is not None else []
            self._db.update(sandbox_id, state=SandboxState.CREATING, layers=chain)
            attached = self._net.find(sandbox_id) if self._net is not None else None
            policy = attached.policy if attached is not None else None
            with timer.phase("teardown"):
                self._live.pop(sandbox_id, None)
                await live.agent.aclose()
                await self._cleanup(sandbox_id, live.info.backend, live.handle)
        info = replace(live.info, state=SandboxState.CREATING, timings={}, error=None)
        if snap is not None:
            new = await self._boot_chain(info, tpl, live.backend, snap.layers, timer, existing=True, policy=policy)
        else:
            new = await self._boot_live(info, tpl, live.backend, timer, existing=True, policy=policy)
        new.from_pool = live.from_pool
        self._schedule_expiry(new)
        self._emit_counts()
        return new.info

    # ------------------------------------------------------------------ network (docs/networking.md)
    async def get_network(self, sandbox_id: str) -> Attachment:
        """The sandbox's address and egress policy."""
        live = self._require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        return self._attachment(live)

    async def loopback_socket(self, sandbox_id: str) -> socket.socket | None:
        """An unconnected TCP socket in the sandbox's own network namespace, so that 127.0.0.1 is the sandbox's
        loopback (the port proxy's way to servers bound to it); None where the sandbox's loopback is out of the
        host's reach (a microVM's is in its guest kernel) or it has no network of its own."""
        live = self._require(sandbox_id, SandboxState.RUNNING)
        if self._net is None or self._net.find(sandbox_id) is None:
            return None
        return await self._net.loopback_socket(live.handle.pid)

    async def update_network(self, sandbox_id: str, patch: Mapping[str, Any]) -> Attachment:
        """Change the egress policy of a running sandbox: keys of ``patch`` (``allow_out``, ``deny_out``,
        ``allow_internet_access``) replace the current values, absent keys stay. Applies at once, also to open
        connections."""
        live = self._require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        att = self._attachment(live)
        self._set_policy(live, att.policy.updated(patch))
        self._db.update(sandbox_id, handle=live.handle)
        return att

    def _attachment(self, live: _Live) -> Attachment:
        att = self._net.find(live.info.id) if self._net is not None else None
        if att is None:
            raise NotSupportedError(
                f"sandbox {live.info.id} has no network: networking is off in this daemon (set network = true)"
            )
        return att

    def _policy_for(
        self, be: Backend, internet: bool | None, network: Mapping[str, Any] | None
    ) -> NetworkPolicy | None:
        """Validate the create() network arguments; None when the sandbox gets no network."""
        if self._net is None or not be.capabilities.network:
            if internet or network:
                raise NotSupportedError(
                    "this daemon gives sandboxes no network (loopback only): enable networking (network = true) "
                    "or drop allow_internet_access/network"
                )
            return None
        return NetworkPolicy.of(internet, network)

    async def _wire_and_connect(
        self, be: Backend, handle: SandboxHandle, policy: NetworkPolicy, timer: PhaseTimer
    ) -> tuple[SandboxHandle, AgentClient]:
        """The network and the agent's connection at once: the kernel wires the veth (on a thread of its own)
        while the agent answers. The phases overlap, so they add up to more than the time both took."""

        async def wire() -> SandboxHandle:
            with timer.phase("network"):
                return await self._attach_network(handle, policy)

        wiring = asyncio.ensure_future(wire())
        try:
            with timer.phase("agent_connect"):
                agent = await self._connect_agent(be, handle)
        except BaseException:
            await asyncio.gather(wiring, return_exceptions=True)  # an attachment made is detached by the cleanup
            raise
        try:
            wired = await wiring
        except BaseException:
            await agent.aclose()
            raise
        return wired, agent

    async def _attach_network(self, handle: SandboxHandle, policy: NetworkPolicy) -> SandboxHandle:
        assert self._net is not None
        att = await self._net.attach(handle.sandbox_id, handle.pid, policy)
        return replace(handle, extra={**handle.extra, **att.extra()})

    def _set_policy(self, live: _Live, policy: NetworkPolicy) -> None:
        """Apply ``policy`` if it differs (one in-process nftables transaction) and keep it in the handle."""
        att = self._attachment(live)
        if att.policy == policy:
            return
        self._net.apply(live.info.id, policy)  # type: ignore[union-attr]
        live.handle = replace(live.handle, extra={**live.handle.extra, **att.extra()})

    async def wait_background(self) -> None:
        """Wait until background work started so far (layer removal, flattening, size measurement) is done."""
        while pending := [t for t in self._background if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    def _snapshot_or_raise(self, id_or_name: str) -> SnapshotInfo:
        snap = self._db.get_snapshot(id_or_name)
        if snap is None:
            raise SnapshotNotFoundError(f"snapshot {id_or_name!r} does not exist: list them with list_snapshots()")
        return snap

    async def _capture(self, live: _Live, name: str | None, timer: PhaseTimer, *, hidden: bool) -> SnapshotInfo:
        """Freeze the sandbox, turn its upper into a durable layer, thaw; record layer + snapshot durably."""
        sid = live.info.id
        memory = isinstance(live.backend, MemorySnapshots) and live.backend.capabilities.memory_snapshot
        if self.settings.tmp_tmpfs_mb and not memory:
            raise NotSupportedError(
                f"sandbox {sid} keeps /tmp in memory (tmp_tmpfs_mb = {self.settings.tmp_tmpfs_mb} in this daemon's "
                "settings), which a snapshot or fork of files cannot capture: set tmp_tmpfs_mb = 0 to keep /tmp on "
                "the sandbox's disk"
            )
        async with live.lock:
            if live.destroying or live.info.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                raise InvalidStateError(f"sandbox {sid} is {live.info.state.value}", state=live.info.state.value)
            rec = self._db.get(sid)
            lowers = rec.layers if rec is not None else ()
            lid = snaps.new_layer_id()
            dest = self._layer_path(lid)
            running = live.info.state is SandboxState.RUNNING
            with timer.phase("freeze"):
                if running:
                    await live.backend.pause(live.handle)
            self._last_capture = time.monotonic()
            try:
                with timer.phase("capture"):
                    if memory:
                        assert isinstance(live.backend, MemorySnapshots)
                        layer = await live.backend.capture(live.handle, dest)  # memory, devices and disk
                    else:
                        upper = self._driver.upper_dir(self._sandbox_dir(sid))
                        layer = await asyncio.to_thread(self._driver.freeze_upper, upper, dest, durable=not hidden)
            except BaseException as exc:
                await asyncio.to_thread(self._driver.remove_layer, dest)
                if live.destroying:
                    raise SandboxNotFoundError(f"sandbox {sid} was destroyed during the snapshot") from exc
                raise
            finally:
                if running and not live.destroying:
                    with timer.phase("thaw"):
                        await live.backend.resume(live.handle)
            if live.destroying:  # destroyed meanwhile: its lowers may be freed already
                await asyncio.to_thread(self._driver.remove_layer, dest)
                raise SandboxNotFoundError(f"sandbox {sid} was destroyed during the snapshot")
        now = time.time()
        snap = SnapshotInfo(
            id=snaps.new_snapshot_id(),
            name=name,
            sandbox_id=sid,
            template=live.info.template,
            template_digest=live.info.template_digest,
            created_at=now,
            layers=(lid, *lowers),
            driver=self._driver.name,
            size_bytes=layer.size_bytes,
            files=layer.files,
        )
        try:
            with timer.phase("store"), self._db.durable() if not hidden else contextlib.nullcontext():
                owner = rec.uid_base if rec is not None else self.settings.idmap.host_base  # the writer's range
                self._db.insert_layer(LayerRecord(lid, dest, lowers[0] if lowers else None, self._driver.name,
                                                  layer.size_bytes, layer.files, now, owner))  # fmt: skip
                self._db.insert_snapshot(replace(snap, timings=timer.as_dict()), hidden=hidden,
                                         disk_mb=live.info.resources.disk_mb)  # fmt: skip
        except Exception as exc:
            await asyncio.to_thread(self._driver.remove_layer, dest)
            if name is not None and self._db.get_snapshot(name, hidden=True) is not None:
                raise ConflictError(f"a snapshot named {name!r} exists already: pick another name") from exc
            raise
        if layer.size_bytes is None and not hidden:  # a fork's layer: no snapshot reports it, and walking its
            self._spawn_bg(self._measure(lid, dest))  # files would compete with the children's boots
        if not hidden and len(snap.layers) > snaps.FLATTEN_DEPTH and not live.backend.capabilities.memory_snapshot:
            self._spawn_bg(self._flatten_bg(snap))
        return replace(snap, timings=timer.as_dict())

    async def _restore(
        self,
        info: SandboxInfo,
        tpl: TemplateInfo,
        be: Backend,
        chain: Sequence[str],
        timer: PhaseTimer,
        *,
        stack: bool = False,
        policy: NetworkPolicy | None = None,
    ) -> SandboxInfo:
        """Boot a new sandbox on a fresh upper over ``chain`` (a snapshot's layers), with a fresh machine-id
        (``stack``: see ``_boot_chain``)."""
        try:
            live = await self._boot_chain(info, tpl, be, chain, timer, stack=stack, policy=policy)
        except BaseException as exc:
            code = exc.code if isinstance(exc, BranchboxError) else "internal"
            self._emit(ManagerEvent("create", info.id, info.backend, info.source, "error", timer.total_ms / 1e3,
                                    code=code))  # fmt: skip
            raise
        self._schedule_expiry(live)
        self._emit(ManagerEvent("create", info.id, info.backend, info.source, "ok", timer.total_ms / 1e3,
                                timings=live.info.timings))  # fmt: skip
        self._emit_counts()
        return live.info

    async def _boot_chain(
        self,
        info: SandboxInfo,
        tpl: TemplateInfo,
        be: Backend,
        chain: Sequence[str],
        timer: PhaseTimer,
        *,
        existing: bool = False,
        stack: bool = False,
        policy: NetworkPolicy | None = None,
        pool: str | None = None,
    ) -> _Live:
        """Boot on a chain of layers (topmost first); a driver that clones starts the upper as the top layer,
        unless ``stack``: then every layer stays a lower (a fork's children: a btrfs snapshot per child commits a
        transaction, ~4 ms each and one at a time, while stacking one more read-only layer costs nothing)."""
        if be.capabilities.memory_snapshot and chain:  # a VM continues from the top layer (its disk chains down)
            return await self._boot_live(info, tpl, be, timer, lowers=list(chain), memory=chain[0], existing=existing)
        if len(chain) > snaps.MAX_CHAIN:
            with timer.phase("flatten"):
                chain = [await self._flatten_now(chain)]
        idmap = self._idmap_for(info.id, be, existing=existing)
        # the upper starts as a clone of the top layer only when that layer is owned in the sandbox's own range
        # (a reset to its own snapshot); else every layer is a lower, mounted idmapped where its range differs
        if (
            self._driver.clones_layers
            and chain
            and not stack
            and self._db.layer_uid_bases(chain[:1])[0] == idmap.host_base
        ):
            base, lowers = chain[0], list(chain[1:])
        else:
            base, lowers = None, list(chain)
        return await self._boot_live(
            info,
            tpl,
            be,
            timer,
            lowers=lowers,
            base=base,
            fresh_machine_id=True,
            existing=existing,
            pool=pool,
            policy=policy,
            idmap=idmap,
        )

    async def _prepare_dirs(
        self, sid: str, base: Path | None, lowers: Sequence[Path], machine_id: bool, disk_mb: int = 0,
        idmap: IdMap | None = None, bases: Sequence[int] = (),
    ) -> SandboxDirs:  # fmt: skip
        idmap = idmap or self.settings.idmap

        def prepare() -> SandboxDirs:
            # disk_mb: btrfs sets it (and the daemon's disk group) by the ioctl that makes the upper
            dirs = self._driver.prepare_sandbox(self._sandbox_dir(sid), idmap, base=base, disk_mb=disk_mb)
            if machine_id:
                snaps.write_machine_id(dirs.upper, lowers, idmap, bases)
            return dirs

        if base is None:  # a few mkdirs (a subvolume on btrfs: ~0.1 ms) and a machine-id: cheaper than a thread hop
            return prepare()
        return await asyncio.to_thread(prepare)  # a clone of ``base``: a btrfs snapshot commits a transaction

    def _idmap_for(self, sid: str, be: Backend, *, existing: bool) -> IdMap:
        """The host uid range sandbox ``sid`` boots in: its own (kept across a reset), or the canonical one
        (backends without host uids, daemons without a uid block, records of older daemons)."""
        if existing and (rec := self._db.get(sid)) is not None:
            return IdMap(rec.uid_base, self.settings.idmap.count)
        if self._ids is not None and isinstance(be, HostIdRanges):
            return be.choose_idmap(sid)
        return self.settings.idmap

    def _layer_path(self, layer_id: str) -> Path:
        return self.settings.data_dir / "layers" / layer_id

    def _lower_path(self, layer_id: str) -> Path:
        return self._driver.layer_lower(self._layer_path(layer_id))

    @property
    def _driver(self) -> StorageDriver:
        if self._storage is None:
            raise InvalidStateError("the manager is not started: use `async with Manager.open(...)`")
        return self._storage

    @property
    def storage_driver(self) -> str:
        return self._driver.name

    async def _flatten_now(self, chain: Sequence[str]) -> str:
        """Merge ``chain`` into a new layer and record it (unreferenced: the caller must reference it at once)."""
        lid = snaps.new_layer_id()
        dest = self._layer_path(lid)
        paths = [self._lower_path(x) for x in chain]
        try:
            layer = await asyncio.to_thread(snaps.flatten_canonical, self._driver, paths, dest,
                                            self._db.layer_uid_bases(chain), self.settings.idmap)  # fmt: skip
        except BaseException:
            await asyncio.to_thread(self._driver.remove_layer, dest)
            raise
        with self._db.durable():
            self._db.insert_layer(LayerRecord(lid, dest, None, self._driver.name, layer.size_bytes, layer.files,
                                              time.time()))  # fmt: skip
        return lid

    async def _flatten_bg(self, snap: SnapshotInfo) -> None:
        """Replace a deep snapshot chain by one flat layer; living children keep the old layers they use."""
        lid = snaps.new_layer_id()
        dest = self._layer_path(lid)
        paths = [self._lower_path(x) for x in snap.layers]
        try:
            layer = await asyncio.to_thread(snaps.flatten_canonical, self._driver, paths, dest,
                                            self._db.layer_uid_bases(snap.layers), self.settings.idmap)  # fmt: skip
        except Exception:
            log.exception("flattening snapshot %s failed; it keeps its chain", snap.id)
            await asyncio.to_thread(self._driver.remove_layer, dest)
            return
        cur = self._db.get_snapshot(snap.id, hidden=True)
        if cur is None or cur.layers != snap.layers or self._closed:
            await asyncio.to_thread(self._driver.remove_layer, dest)
            return
        with self._db.durable():
            self._db.insert_layer(LayerRecord(lid, dest, None, self._driver.name, layer.size_bytes, layer.files,
                                              time.time()))  # fmt: skip
            self._db.set_snapshot_layers(snap.id, [lid])
        self._schedule_gc()

    async def _measure(self, layer_id: str, path: Path) -> None:
        """Measure a layer in the background: one at a time, after captures have paused (a walk of 20k files
        running during a snapshot contends with its btrfs commit and fsyncs: 2-3x slower snapshots)."""
        async with self._measuring:
            while (wait := self._last_capture + MEASURE_QUIET_S - time.monotonic()) > 0:  # noqa: ASYNC110 - a debounce
                await asyncio.sleep(wait)
            try:
                usage = await disk_usage_niced(path)
            except OSError:
                return
        if self._db.get_layer(layer_id) is not None and not self._closed:
            self._db.set_layer_usage(layer_id, usage.size_bytes, usage.files)

    def _forget(self, sandbox_id: str) -> None:
        """Delete a sandbox record; layers only it used are freed in the background."""
        self._db.delete(sandbox_id)
        if self._ids is not None:
            self._ids.release(sandbox_id)
        self._schedule_gc()

    def _schedule_gc(self) -> None:
        if self._gc_task is not None and not self._gc_task.done():
            self._gc_again = True
            return
        self._gc_task = asyncio.get_running_loop().create_task(self._gc())
        self._background.add(self._gc_task)
        self._gc_task.add_done_callback(self._background.discard)

    async def _gc(self) -> None:
        """Remove layers that no snapshot and no sandbox references (row first: a crash leaves an orphan dir)."""
        while True:
            self._gc_again = False
            for layer in self._db.unreferenced_layers():
                self._db.delete_layer(layer.id)
                try:
                    await asyncio.to_thread(self._driver.remove_layer, layer.path)
                except OSError:
                    log.exception("removing layer %s failed", layer.id)
            if not self._gc_again:
                return

    async def _reconcile_layers(self) -> None:
        """After a restart: drop hidden snapshots of interrupted forks, orphan layer dirs, unmeasured sizes."""
        visible = {s.id for s in self._db.snapshots()}
        for s in self._db.snapshots(hidden=True):
            if s.id not in visible:
                self._db.delete_snapshot(s.id)
        layers = self._db.all_layers()
        known = {x.id for x in layers}
        for d in (self.settings.data_dir / "layers").iterdir():
            if d.name not in known:
                await asyncio.to_thread(self._driver.remove_layer, d)
        for x in layers:
            if x.size_bytes is None:
                self._spawn_bg(self._measure(x.id, x.path))
        self._schedule_gc()

    # ------------------------------------------------------------------ layers kept by caches (git workspaces)
    def layer_path(self, layer_id: str) -> Path:
        """Where the layer ``layer_id`` lives (``DATA/layers/<id>``)."""
        return self._layer_path(layer_id)

    def lower_path(self, layer_id: str) -> Path:
        """The directory of layer ``layer_id`` that an overlay mounts as a lower."""
        return self._lower_path(layer_id)

    def add_pinned_layer(self, layer_id: str, owner: str, *, below: Sequence[str] = ()) -> None:
        """Record the finished layer at ``layer_path(layer_id)`` durably, kept alive (with the layers ``below``
        it) by the pin ``owner``."""
        with self._db.durable():
            self._db.insert_layer(LayerRecord(layer_id, self._layer_path(layer_id), below[0] if below else None,
                                              self._driver.name, None, None, time.time()))  # fmt: skip
            for lid in (layer_id, *below):
                self._db.pin_layer(lid, owner)
        self._spawn_bg(self._measure(layer_id, self._layer_path(layer_id)))

    def layer_uid_bases(self, layer_ids: Sequence[str]) -> builtins.list[int]:
        """The host uid range each layer's files are owned in (its writer's; flattened and cached ones: canonical)."""
        return self._db.layer_uid_bases(layer_ids)

    def pin_layers(self, layers: Sequence[str], owner: str) -> None:
        """Keep the recorded ``layers`` (a snapshot's chain) alive under the pin ``owner``."""
        with self._db.durable():
            for lid in layers:
                self._db.pin_layer(lid, owner)

    def unpin_layers(self, owner: str) -> None:
        """Drop the pins of ``owner``; its layers go once no sandbox uses them."""
        self._db.unpin_layers(owner)
        self._schedule_gc()

    async def create_on_layers(
        self,
        layers: Sequence[str],
        *,
        template: str = "default",
        source: str = "workspace",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        cpu: float = DEFAULT_CPU,
        memory_mb: int = DEFAULT_MEMORY_MB,
        pids: int = DEFAULT_PIDS,
        metadata: Mapping[str, str] | None = None,
        warm: bool = False,
        warm_up: Sequence[str] = ("true",),
    ) -> SandboxInfo:
        """Boot a sandbox on ``layers`` (topmost first) above ``template``, like a restore.

        ``warm``: keep one spare booted on this chain for the next call (for the ``LAYER_POOLS`` most recently
        used chains) and claim it when there is one; ``warm_up`` runs in a spare before it is ready (e.g. a
        ``git status`` that fills the new overlay's dentry cache)."""
        timer = PhaseTimer()
        with timer.phase("validate"):
            env_, meta, ttl = self._check_create_input(env, metadata, timeout, cpu, memory_mb, pids)
            tpl = self.templates.get(template)
            be = await self._backend(self.settings.default_backend)
        if warm:  # a spare booted on this chain ahead of demand: claim it, like a warm pool member
            pool = self._layer_pool(list(layers), tpl.name, list(warm_up))
            member = pool.take() if pool.config.matches(cpu, memory_mb, pids) else None
            if member is not None:
                try:
                    return await self._claim(member, pool, env_, meta, ttl, None, timer, pool_name=member.pooled)
                except BranchboxError as exc:
                    log.warning("claim of spare %s failed (%s); booting", member.info.id, exc)
                    self._spawn_bg(self._destroy(member.info.id))
        res = Resources(cpu=float(cpu), memory_mb=memory_mb, pids=pids)
        info = replace(self._new_info(tpl, be.name, res, env_, meta, ttl, None), source=source)
        return await self._restore(info, tpl, be, list(layers), timer)

    def _layer_pool(self, chain: builtins.list[str], template: str, warm_up: builtins.list[str]) -> Pool[_Live]:
        """The pool of one spare for ``chain`` (created on first use; the least recently used of more than
        ``LAYER_POOLS`` is closed and its spare destroyed)."""
        name = f"layers:{template}:{'+'.join(chain)}"
        pool = self._layer_pools.pop(name, None)
        if pool is None:
            cfg = PoolConfig(template=template, max_size=1, target_free=1, max_parallel_boots=1)

            async def boot(config: PoolConfig) -> _Live:
                return await self._boot_member(config, chain=chain, name=name, warm_up=warm_up)

            pool = Pool(cfg, boot)
            # the first spare boots after the caller's own sandbox, not in competition with it
            asyncio.get_running_loop().call_later(REFILL_DELAY_S, pool.start)
        self._layer_pools[name] = pool  # most recently used last
        while len(self._layer_pools) > LAYER_POOLS:
            old = self._layer_pools.pop(next(iter(self._layer_pools)))
            self._spawn_bg(self._close_pool(old))
        return pool

    async def wait_layer_spares(self) -> None:
        """Wait until every hot layer chain has its spare booted (for tests and benchmarks: a spare boots in the
        background after the create that made its chain hot, so a second create at once may find none yet)."""
        await asyncio.gather(*(pool.wait_ready() for pool in self._layer_pools.values()))

    def drop_spares(self, layer_id: str) -> None:
        """Close the layer pools whose chain holds ``layer_id`` (their spares would keep it alive)."""
        for name in [n for n in self._layer_pools if layer_id in n.rsplit(":", 1)[-1].split("+")]:
            self._spawn_bg(self._close_pool(self._layer_pools.pop(name)))

    async def _close_pool(self, pool: Pool[_Live]) -> None:
        for member in await pool.aclose():
            member.pooled = None
            await self._destroy(member.info.id)

    def _pool_named(self, name: str | None) -> Pool[_Live] | None:
        if name is None:
            return None
        return self._pools.get(name) or self._layer_pools.get(name)

    # ------------------------------------------------------------------ warm pools
    def pool_statistics(self) -> builtins.list[PoolStats]:
        return [p.statistics() for p in self._pools.values()]

    def _pool_key(self, template: str, backend: str | None) -> str:
        """The name a pool is known by (in the store and logs): its template's, plus ``@backend`` for a backend
        other than the default."""
        kind = backend or self.settings.default_backend
        return template if kind == self.settings.default_backend else f"{template}@{kind}"

    async def _resolve_pool(self, config: PoolConfig) -> tuple[str, PoolConfig]:
        """The key of the pool ``config`` describes and the config with its backend named; an unknown backend raises
        not_supported."""
        kind = config.backend or self.settings.default_backend
        await self._backend(kind)
        return self._pool_key(config.template, kind), replace(config, backend=kind)

    def _no_pool(self, template: str, backend: str | None) -> NotFoundError:
        on = "" if backend in (None, self.settings.default_backend) else f" on backend {backend!r}"
        return NotFoundError(f"there is no warm pool for template {template!r}{on}")

    async def configure_pool(self, config: PoolConfig) -> PoolStats:
        """Create or change the warm pool of ``config.template`` on ``config.backend`` (None: the default backend),
        live. Members that no longer fit go."""
        self.templates.get(config.template)
        key, config = await self._resolve_pool(config)
        pool = self._pools.get(key)
        if pool is None:
            pool = Pool(config, self._boot_member)
            self._pools[key] = pool
            pool.start()
            return pool.statistics()
        old = pool.config
        pool.config = config
        if not config.matches(old.cpu, old.memory_mb, old.pids):
            stale = list(pool.ready)
            pool.ready.clear()
        else:
            stale = pool.surplus()
        for member in stale:
            member.pooled = None
            self._spawn_bg(self._destroy(member.info.id))
        pool.wake()
        return pool.statistics()

    async def remove_pool(self, template: str, *, backend: str | None = None) -> None:
        pool = self._pools.pop(self._pool_key(template, backend), None)
        if pool is None:
            raise self._no_pool(template, backend)
        for member in await pool.aclose():
            member.pooled = None
            await self._destroy(member.info.id)

    async def wait_pool_ready(self, template: str, count: int | None = None, *, backend: str | None = None) -> None:
        """Wait until the pool of ``template`` (on ``backend``) has ``count`` (default: its target) ready members."""
        pool = self._pools.get(self._pool_key(template, backend))
        if pool is None:
            raise self._no_pool(template, backend)
        await pool.wait_ready(count)

    async def _boot_member(
        self,
        config: PoolConfig,
        *,
        chain: builtins.list[str] | None = None,
        name: str | None = None,
        warm_up: Sequence[str] = ("true",),
    ) -> _Live:
        tpl = self.templates.get(config.template)
        be = await self._backend(config.backend or self.settings.default_backend)
        res = Resources(cpu=float(config.cpu), memory_mb=config.memory_mb, pids=config.pids,
                        disk_mb=self._disk_mb(None, be))  # fmt: skip
        info = replace(self._new_info(tpl, be.name, res, {}, {}, None, None), source="warm")
        if chain:  # a spare of a layer pool: booted like a restore onto the chain
            live = await self._boot_chain(info, tpl, be, chain, PhaseTimer(), pool=name)
        else:
            live = await self._boot_live(info, tpl, be, PhaseTimer(), pool=self._pool_key(config.template, be.name))
        # one throw-away command warms the agent's code paths (a forked agent's first exec pays its copy-on-write
        # page faults, ~1 ms here), so the user's first command in a claimed sandbox runs at full speed
        try:
            await live.agent.exec(list(warm_up), timeout=60)
        except BaseException:
            live.pooled = None
            await self._destroy(info.id)
            raise
        return live

    # ------------------------------------------------------------------ templates
    async def list_templates(self) -> builtins.list[TemplateInfo]:
        return self.templates.list()

    # ------------------------------------------------------------------ internals
    @property
    def _db(self) -> Store:
        if self._store is None:
            raise InvalidStateError("the manager is not started: use `async with Manager.open(...)`")
        return self._store

    def _sandbox_dir(self, sandbox_id: str) -> Path:
        return self.settings.data_dir / "sandboxes" / sandbox_id

    async def _connect_agent(self, be: Backend, handle: SandboxHandle) -> AgentClient:
        return await AgentClient.connect(handle.agent_address, timeout=self.settings.agent_connect_timeout,
                                         open_session=be.capabilities.agent_session)  # fmt: skip

    async def _backend(self, kind: str) -> Backend:
        be = self._backends.get(kind)
        if be is None:
            be = make_backend(kind, self.settings, self._ids)
            await be.start()
            self._backends[kind] = be
        return be

    def _require(self, sandbox_id: str, *states: SandboxState) -> _Live:
        live = self._live.get(sandbox_id)
        if live is not None and live.pooled is not None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
        if live is None or live.destroying:
            rec = None if live is not None else self._db.get(sandbox_id)
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

    async def _agent_call(self, live: _Live, coro: Awaitable[_T]) -> _T:
        self._liveness.kick()
        try:
            return await coro
        except AgentDisconnectedError as exc:
            raise await self._disconnected(live) from exc
        except BranchboxError as exc:
            self._emit(ManagerEvent("error", live.info.id, code=exc.code, operation="agent"))
            raise

    async def _disconnected(self, live: _Live) -> BranchboxError:
        if live.info.state is SandboxState.ERROR:
            return InvalidStateError(f"sandbox {live.info.id} is in error: {live.info.error}", state="error")
        try:  # the kernel closes a dying init's socket before it is gone: give its exit a moment to show
            async with asyncio.timeout(EXIT_GRACE_S):
                await live.backend.wait_exit(live.handle)
        except TimeoutError:
            return AgentDisconnectedError(f"lost the connection to the agent of sandbox {live.info.id}")
        return InvalidStateError(f"sandbox {live.info.id} has stopped: its init process exited", state="error")

    def _check_agents(self) -> bool:
        """The liveness check (core/liveness.py): a running sandbox with calls open on a stopped agent is marked
        error and its connection dropped, which fails those calls and streams at once. True while calls are open."""
        busy = False
        for live in list(self._live.values()):
            if live.destroying or live.info.state is not SandboxState.RUNNING or not live.agent.open_calls:
                continue
            busy = True
            if is_stopped(live.handle.pid):
                why = (f"its agent (host pid {live.handle.pid}) is stopped (SIGSTOP or a debugger) and answers "
                       "nothing; destroy the sandbox")  # fmt: skip
                log.warning("sandbox %s: %s", live.info.id, why, extra={"sandbox_id": live.info.id})
                self._set_state(live, SandboxState.ERROR, why)
                live.agent.abort()
        return busy

    def _set_state(self, live: _Live, state: SandboxState, error: str | None = None) -> SandboxInfo:
        live.info = replace(live.info, state=state, error=error)
        self._db.update(live.info.id, state=state, error=error)
        self._emit_counts()
        return live.info

    def _schedule_expiry(self, live: _Live) -> None:
        if live.expiry is not None:
            live.expiry.cancel()
            live.expiry = None
        if live.info.expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, live.info.expires_at - time.time())
        live.expiry = loop.call_at(loop.time() + delay, self._expire, live.info.id)

    def _expire(self, sandbox_id: str) -> None:
        log.info("sandbox %s reached its timeout; destroying it", sandbox_id, extra={"sandbox_id": sandbox_id})
        self._spawn_bg(self._destroy(sandbox_id))

    def _watch(self, live: _Live) -> None:
        async def watch() -> None:
            await live.backend.wait_exit(live.handle)
            if live.destroying or self._closed:
                return
            pool = self._pool_named(live.pooled)
            if pool is not None:  # a ready member died: forget it, the pool boots a replacement
                log.warning("pool %s: member %s died; replacing it", live.pooled, live.info.id)
                live.destroying = True
                pool.discard(live)
                self._cancel_timers(live, watcher=False)
                await live.agent.aclose()
                self._live.pop(live.info.id, None)
                self._forget(live.info.id)
                await self._cleanup(live.info.id, live.info.backend, live.handle)
                return
            log.warning("sandbox %s init exited unexpectedly", live.info.id, extra={"sandbox_id": live.info.id})
            self._set_state(live, SandboxState.ERROR, "the sandbox's init process exited")
            self._cancel_timers(live, watcher=False)
            await live.agent.aclose()
            self._live.pop(live.info.id, None)
            await self._cleanup(live.info.id, live.info.backend, live.handle, keep_record_dir=False)

        live.watcher = asyncio.get_running_loop().create_task(watch())

    def _cancel_timers(self, live: _Live, *, watcher: bool = True) -> None:
        if live.expiry is not None:
            live.expiry.cancel()
            live.expiry = None
        if watcher and live.watcher is not None and live.watcher is not asyncio.current_task():
            live.watcher.cancel()

    def _spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cleanup(
        self, sandbox_id: str, kind: str, handle: SandboxHandle | None, *, keep_record_dir: bool = False
    ) -> None:
        """Remove everything of one sandbox; never raises for things already gone."""
        try:
            be = await self._backend(kind)
            await be.destroy(sandbox_id, handle)
        except Exception:
            log.exception("backend cleanup of %s failed", sandbox_id, extra={"sandbox_id": sandbox_id})
            if self._ids is not None and (rec := self._db.get(sandbox_id)) is not None:
                self._ids.hold(rec.uid_base, f"unclean:{sandbox_id}")  # its processes may live: never lend it again
        if self._net is not None:
            try:
                await self._net.detach(sandbox_id, handle.extra if handle is not None else None)
            except Exception:
                log.exception("network cleanup of %s failed", sandbox_id, extra={"sandbox_id": sandbox_id})
        if not keep_record_dir:
            await asyncio.to_thread(self._driver.remove_sandbox, self._sandbox_dir(sandbox_id))

    async def _reconcile(self) -> None:
        """Match the store with reality after a (re)start: re-attach, mark dead, remove orphans."""
        for rec in list(self._db.all()):
            info = rec.info
            if info.state not in _ACTIVE:
                continue
            be = await self._backend(info.backend)
            alive = rec.handle is not None and info.state is not SandboxState.CREATING and be.is_alive(rec.handle)
            if not alive or rec.handle is None:
                if info.state is SandboxState.CREATING or rec.pool is not None:
                    await self._cleanup(info.id, info.backend, rec.handle)
                    self._forget(info.id)
                else:
                    await self._cleanup(info.id, info.backend, rec.handle)
                    self._db.update(
                        info.id, state=SandboxState.ERROR, error="the sandbox died while the daemon was down"
                    )
                continue
            try:
                agent = await self._reattach_agent(be, rec.handle, paused=info.state is SandboxState.PAUSED)
            except Exception as exc:
                log.warning("cannot re-attach sandbox %s: %s", info.id, exc, extra={"sandbox_id": info.id})
                await self._cleanup(info.id, info.backend, rec.handle)
                self._db.update(info.id, state=SandboxState.ERROR, error=f"could not re-attach its agent: {exc}")
                continue
            pool = self._pools.get(rec.pool) if rec.pool else None
            if rec.pool is not None and (pool is None or pool.config.template != info.template
                                         or pool.config.backend != info.backend
                                         or not pool.config.matches(info.resources.cpu, info.resources.memory_mb,
                                                                    info.resources.pids)):  # fmt: skip
                await agent.aclose()  # a member of a pool that is gone or changed
                await self._cleanup(info.id, info.backend, rec.handle)
                self._forget(info.id)
                continue
            live = _Live(info=info, handle=rec.handle, agent=agent, backend=be, pooled=rec.pool)
            if self._net is not None:
                try:
                    self._net.restore(info.id, rec.handle.extra)
                except BranchboxError as exc:  # it keeps running without egress (its veth is not owned)
                    log.warning("cannot restore the network of %s: %s", info.id, exc, extra={"sandbox_id": info.id})
            self._live[info.id] = live
            self._watch(live)
            if pool is not None:
                pool.ready.append(live)
            else:
                self._schedule_expiry(live)
        keep = set(self._live)
        for be in list(self._backends.values()):
            await be.cleanup_orphans(keep)
        if self._net is not None:
            await self._net.remove_orphans()
        known = {rec.info.id for rec in self._db.all()}
        for d in (self.settings.data_dir / "sandboxes").iterdir():
            if d.name not in known:
                await asyncio.to_thread(self._driver.remove_sandbox, d)
        await self._reconcile_layers()
        self._emit_counts()

    async def _reattach_agent(self, be: Backend, handle: SandboxHandle, *, paused: bool) -> AgentClient:
        """Connect to a sandbox's agent after a restart. A frozen agent sends no HELLO: a sandbox the daemon froze
        for a snapshot or fork when it died is still frozen (its record says running) and is thawed; a paused one
        is thawed just long enough for the HELLO, then frozen again."""
        if be.capabilities.pause:
            try:
                await be.resume(handle)
            except Exception as exc:  # never fatal here: the connect below says what is wrong
                log.warning("cannot thaw %s: %s", handle.sandbox_id, exc, extra={"sandbox_id": handle.sandbox_id})
        agent = await self._connect_agent(be, handle)
        if paused and be.capabilities.pause:
            try:
                await be.pause(handle)
            except BaseException:
                await agent.aclose()
                raise
        return agent

    def _emit(self, ev: ManagerEvent) -> None:
        """Queue ``ev`` for the subscribers, who get it soon after (in order, once the current step of the event
        loop is done): a create or an exec returns to its caller first, and the daemon answers it before its
        metrics are counted. Outside an event loop they get it at once."""
        if not self._wanted(ev.kind):
            return
        self._events.append(ev)
        if len(self._events) > 1:  # a delivery is scheduled already
            return
        try:
            asyncio.get_running_loop().call_soon(self._deliver)
        except RuntimeError:
            self._deliver()

    def _wanted(self, kind: str) -> bool:
        return any(sub.wants(kind) for sub in self._subscribers)

    def _deliver(self) -> None:
        events, self._events = self._events, []
        for ev in events:
            for sub in self._subscribers:
                if not sub.wants(ev.kind):
                    continue
                try:
                    sub.fn(ev)
                except Exception:
                    log.exception("event subscriber failed")

    def _emit_counts(self) -> None:
        if self._wanted("state"):
            self._emit(ManagerEvent("state", counts=self.state_counts()))

    def open_agent_calls(self) -> int:
        """Calls and streams open on the agents of live sandboxes (0 when nothing waits on any agent)."""
        return sum(live.agent.open_calls for live in self._live.values())

    def state_counts(self) -> dict[str, int]:
        """Sandboxes by state, as :meth:`list` shows them (every state present; warm pool members not counted:
        they are no one's yet). A dead sandbox (error, stopped) is no longer live but its record is kept for
        inspection until it is destroyed: it is counted from the store."""
        counts = {s.value: 0 for s in SandboxState}
        for live in self._live.values():
            if live.pooled is None:
                counts[live.info.state.value] += 1
        counts[SandboxState.CREATING.value] += len(self._creating)
        for sid, state in self._db.states():
            if sid not in self._live and sid not in self._creating:
                counts[state.value] += 1
        return counts
