"""The lifecycle commands of a sandbox: create (cold, warm from a pool, or a restore), get, list, set_timeout,
pause, resume, destroy. The states each allows are in ``core/manager.py``'s docstring."""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable, Collection, Mapping
from dataclasses import replace
from typing import Any

from branchbox.core import disk, validate
from branchbox.core.boot import BootService, image_user
from branchbox.core.events import ManagerEvent
from branchbox.core.network import NetworkService
from branchbox.core.pool import Pool
from branchbox.core.runtime import Live, Runtime
from branchbox.errors import BranchboxError, LimitExceededError, NotSupportedError, SandboxNotFoundError
from branchbox.limits import DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_PIDS
from branchbox.models import Resources, SandboxInfo, SandboxState, TimeoutPolicy
from branchbox.net import NetworkPolicy
from branchbox.timing import PhaseTimer

log = logging.getLogger("branchbox.manager")


class Lifecycle:
    def __init__(self, rt: Runtime, boot: BootService, network: NetworkService) -> None:
        self.rt = rt
        self.boot = boot
        self.network = network

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
        on_timeout: str = "destroy",
        auto_resume: bool = False,
    ) -> SandboxInfo:
        """Create a sandbox from a template (or restore ``snapshot``: its template wins) and return it running.

        ``allow_internet_access`` (default True) and ``network`` (``allow_out``/``deny_out`` lists) set its egress
        policy (docs/networking.md). ``disk_mb`` limits its writable layer (default: the daemon's
        ``default_disk_mb``; core/disk.py). ``on_timeout`` (``destroy`` or ``pause``) and ``auto_resume`` are its
        :class:`~branchbox.models.TimeoutPolicy`. Bad input changes nothing."""
        rt = self.rt
        timer = PhaseTimer()
        kind = backend or rt.settings.default_backend
        try:
            with timer.phase("validate"):
                env_, meta, ttl = self.check_create_input(env, metadata, timeout, cpu, memory_mb, pids)
                if hostname is not None:
                    validate.hostname(hostname)
                if snapshot is not None:
                    snap = rt.snapshot_or_raise(snapshot)
                    template = snap.template_digest
                tpl = rt.templates.get(template)
                be = await rt.backend(kind)
                disk_mb = self.boot.disk_limit(
                    disk_mb, be, None if snapshot is None else rt.db.snapshot_disk_mb(snap.id)
                )
                policy = self.network.policy_for(be, allow_internet_access, network)
                life = validate.timeout_policy(on_timeout, auto_resume, ttl, pause=be.capabilities.pause)
                disk.check_reserve(rt.settings.data_dir, rt.settings.reserve_mb, "create")
                if snapshot is not None:
                    snap = rt.snapshot_or_raise(snapshot)  # again: it may have been deleted meanwhile
        except BranchboxError as exc:
            rt.emit(ManagerEvent("error", code=exc.code, operation="create"))
            raise
        if snapshot is not None:
            res = Resources(cpu=float(cpu), memory_mb=memory_mb, pids=pids, disk_mb=disk_mb)
            info = replace(self.boot.new_info(tpl, kind, res, env_, meta, ttl, hostname), source="snapshot",
                           lifecycle=life)  # fmt: skip
            return await self.boot.restore(info, tpl, be, snap.layers, timer, policy=policy)
        pool = rt.pools.get(rt.pool_key(tpl.name, kind))
        if pool is not None and pool.config.matches(cpu, memory_mb, pids):
            member = pool.take()
            if member is not None:
                try:
                    return await self.claim(member, pool, env_, meta, ttl, hostname, timer, policy, disk_mb=disk_mb,
                                            lifecycle=life)  # fmt: skip
                except BranchboxError as exc:  # a broken member: drop it, fall back to a cold create
                    log.warning("pool %s: claim of %s failed (%s)", tpl.name, member.info.id, exc)
                    rt.spawn_bg(self.boot.destroy_now(member.info.id))
        res = Resources(cpu=float(cpu), memory_mb=memory_mb, pids=pids, disk_mb=disk_mb)
        info = replace(self.boot.new_info(tpl, kind, res, env_, meta, ttl, hostname), lifecycle=life)
        try:
            live = await self.boot.boot_live(info, tpl, be, timer, policy=policy)
        except BaseException as exc:
            code = exc.code if isinstance(exc, BranchboxError) else "internal"
            rt.emit(ManagerEvent("create", info.id, kind, "cold", "error", timer.total_ms / 1e3, code=code))
            rt.emit(ManagerEvent("error", info.id, code=code, operation="create"))
            raise
        self.boot.schedule_expiry(live)
        log.debug("created sandbox %s timings=%s", info.id, live.info.timings, extra={"sandbox_id": info.id})
        rt.emit(ManagerEvent("create", info.id, kind, "cold", "ok", timer.total_ms / 1e3, timings=live.info.timings))
        rt.emit_counts()
        return live.info

    def check_create_input(
        self,
        env: Mapping[str, str] | None,
        metadata: Mapping[str, str] | None,
        timeout: float | None,
        cpu: float,
        memory_mb: int,
        pids: int,
    ) -> tuple[dict[str, str], dict[str, str], float | None]:
        """What every create checks before it changes anything: (env, metadata, TTL), or a typed error."""
        s = self.rt.settings
        env_ = validate.env(env)
        meta = validate.metadata(metadata)
        ttl = validate.timeout(timeout, default=s.default_timeout, maximum=s.max_timeout)
        validate.resources(cpu, memory_mb, pids)
        if len(self.rt.live) + len(self.rt.creating) >= s.max_sandboxes:
            raise LimitExceededError(f"{s.max_sandboxes} sandboxes exist already: destroy some or raise max_sandboxes")
        return env_, meta, ttl

    async def claim(
        self,
        live: Live,
        pool: Pool[Live],
        env: Mapping[str, str],
        metadata: Mapping[str, str],
        ttl: float | None,
        hostname: str | None,
        timer: PhaseTimer,
        policy: NetworkPolicy | None = None,
        pool_name: str | None = None,
        *,
        disk_mb: int | None = None,
        lifecycle: TimeoutPolicy | None = None,
    ) -> SandboxInfo:
        """The fast path: personalise a ready pool member in at most one agent round trip."""
        rt = self.rt
        with timer.phase("claim"):
            live.backend.foreground(live.handle)
            if disk_mb is not None and disk_mb != live.info.resources.disk_mb:  # members wait with the default
                rt.driver.set_disk_limit(rt.sandbox_dir(live.info.id), disk_mb)  # one ioctl, no commit
                live.info = replace(live.info, resources=replace(live.info.resources, disk_mb=disk_mb))
                rt.db.update(live.info.id, resources=live.info.resources)
            if policy is not None and rt.net is not None:  # members wait with the default policy
                self.network.set_policy(live, policy)
            rename = hostname is not None and hostname != live.info.hostname
            session = live.backend.capabilities.agent_session
            calls: builtins.list[Awaitable[Any]] = []  # at most one round trip: the agent answers them together
            if env:
                tpl = rt.templates.get(live.info.template_digest)
                calls.append(live.agent.configure(env={**(tpl.env if session else {}), **env}, user=image_user(tpl)))
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
                lifecycle=lifecycle or TimeoutPolicy(timeout=ttl),
            )
            live.pooled = None
            live.from_pool = pool_name or rt.pool_key(pool.config.template, pool.config.backend)
            i = live.info
            rt.db.update(i.id, pool=None, created_at=i.created_at, expires_at=i.expires_at, metadata=i.metadata,
                         env=i.env, hostname=i.hostname, source=i.source, timings=i.timings,
                         handle=live.handle, lifecycle=i.lifecycle)  # fmt: skip
        self.boot.schedule_expiry(live)
        pool.record_claim(timer.total_ms)
        rt.emit(ManagerEvent("create", i.id, i.backend, "warm", "ok", timer.total_ms / 1e3, timings=i.timings))
        rt.emit_counts()
        return live.info

    async def get(self, sandbox_id: str) -> SandboxInfo:
        live = self.rt.live.get(sandbox_id)
        if live is not None and live.pooled is None:
            return live.info
        rec = None if live is not None else self.rt.db.get(sandbox_id)
        if rec is None or rec.pool is not None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
        return rec.info

    async def list(
        self, *, metadata: Mapping[str, str] | None = None, states: Collection[SandboxState] | None = None
    ) -> builtins.list[SandboxInfo]:
        out = []
        for rec in self.rt.db.all():
            live = self.rt.live.get(rec.info.id)
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
        rt = self.rt
        live = rt.require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        ttl = validate.timeout(timeout, default=rt.settings.default_timeout, maximum=rt.settings.max_timeout)
        expires = None if ttl is None else time.time() + ttl
        rt.db.update(sandbox_id, expires_at=expires)
        live.info = replace(live.info, expires_at=expires)
        self.boot.schedule_expiry(live)
        return live.info

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        live = self.rt.require(sandbox_id, SandboxState.RUNNING)
        if not live.backend.capabilities.pause:
            raise NotSupportedError(f"backend {live.backend.name} cannot pause sandboxes")
        return await self.boot.pause_live(live)

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        """Thaw a paused sandbox. One its timeout paused (``on_timeout="pause"``) gets its creation time to live
        again, counted from now."""
        live = self.rt.require(sandbox_id, SandboxState.PAUSED)
        async with live.lock:
            if live.info.state is not SandboxState.PAUSED:  # a concurrent resume (or destroy) came first
                return self.rt.require(sandbox_id, SandboxState.RUNNING).info
            await live.backend.resume(live.handle)
            info = self.rt.set_state(live, SandboxState.RUNNING)
            ttl = info.lifecycle.timeout
            if info.expires_at is None and info.lifecycle.on_timeout == "pause" and ttl is not None:
                live.info = info = replace(info, expires_at=time.time() + ttl)
                self.rt.db.update(sandbox_id, expires_at=info.expires_at)
                self.boot.schedule_expiry(live)
            return info

    async def destroy(self, sandbox_id: str) -> None:
        """Kill the sandbox and remove everything it used. Destroying a destroyed sandbox is not_found."""
        rt = self.rt
        t0 = time.perf_counter()
        live = rt.live.get(sandbox_id)
        if live is not None and live.pooled is not None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
        if live is None:
            rec = rt.db.get(sandbox_id)
            if rec is None or rec.pool is not None:
                raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist (it may have been destroyed)")
            # a dead sandbox (state error/stopped) whose record is kept for inspection
            await self.boot.cleanup(sandbox_id, rec.info.backend, rec.handle)
            self.boot.layers.forget(sandbox_id)
            return
        await self.boot.destroy_now(sandbox_id)
        rt.emit(ManagerEvent("destroy", sandbox_id, live.info.backend, seconds=time.perf_counter() - t0))
