"""Warm pools as the Manager runs them: the configured pools per template and backend (``core/pool.py`` is one
pool), and the one-spare pools of hot layer chains that git workspaces boot on (``create_on_layers``).
docs/architecture.md, "Warm pools"."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from branchbox.core.boot import BootService
from branchbox.core.lifecycle import Lifecycle
from branchbox.core.pool import REFILL_DELAY_S, Pool, PoolConfig, PoolStats
from branchbox.core.runtime import Live, Runtime
from branchbox.errors import BranchboxError, NotFoundError
from branchbox.limits import DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_PIDS
from branchbox.models import Resources, SandboxInfo
from branchbox.timing import PhaseTimer

log = logging.getLogger("branchbox.manager")
LAYER_POOLS = 4  # chains of layers (hot git commits) that keep one spare sandbox booted


class WarmPools:
    def __init__(self, rt: Runtime, lifecycle: Lifecycle) -> None:
        self.rt = rt
        self.lifecycle = lifecycle
        self.boot: BootService = lifecycle.boot

    async def open_configured(self) -> None:
        """Make the pools the settings name (not started yet: :meth:`start` after the reconcile)."""
        for cfg in self.rt.settings.pools:
            self.rt.templates.get(cfg.template)  # a pool of an unknown template or backend is a configuration error
            key, resolved = await self._resolve(cfg)
            self.rt.pools[key] = Pool(resolved, self.boot_member)

    def start(self) -> None:
        for pool in self.rt.pools.values():
            pool.start()

    async def aclose(self) -> None:
        for pool in [*self.rt.layer_pools.values(), *self.rt.pools.values()]:
            await pool.aclose()  # ready members stay running and re-join their pool on the next start

    # ------------------------------------------------------------------ configured pools
    def pool_statistics(self) -> builtins.list[PoolStats]:
        return [p.statistics() for p in self.rt.pools.values()]

    async def _resolve(self, config: PoolConfig) -> tuple[str, PoolConfig]:
        """The key of the pool ``config`` describes and the config with its backend named; an unknown backend raises
        not_supported."""
        kind = config.backend or self.rt.settings.default_backend
        await self.rt.backend(kind)
        return self.rt.pool_key(config.template, kind), replace(config, backend=kind)

    def _no_pool(self, template: str, backend: str | None) -> NotFoundError:
        on = "" if backend in (None, self.rt.settings.default_backend) else f" on backend {backend!r}"
        return NotFoundError(f"there is no warm pool for template {template!r}{on}")

    async def configure_pool(self, config: PoolConfig) -> PoolStats:
        """Create or change the warm pool of ``config.template`` on ``config.backend`` (None: the default backend),
        live. Members that no longer fit go."""
        rt = self.rt
        rt.templates.get(config.template)
        key, config = await self._resolve(config)
        pool = rt.pools.get(key)
        if pool is None:
            pool = Pool(config, self.boot_member)
            rt.pools[key] = pool
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
            rt.spawn_bg(self.boot.destroy_now(member.info.id))
        pool.wake()
        return pool.statistics()

    async def remove_pool(self, template: str, *, backend: str | None = None) -> None:
        pool = self.rt.pools.pop(self.rt.pool_key(template, backend), None)
        if pool is None:
            raise self._no_pool(template, backend)
        await self._close_pool(pool)

    async def wait_pool_ready(self, template: str, count: int | None = None, *, backend: str | None = None) -> None:
        """Wait until the pool of ``template`` (on ``backend``) has ``count`` (default: its target) ready members."""
        pool = self.rt.pools.get(self.rt.pool_key(template, backend))
        if pool is None:
            raise self._no_pool(template, backend)
        await pool.wait_ready(count)

    async def boot_member(
        self,
        config: PoolConfig,
        *,
        chain: builtins.list[str] | None = None,
        name: str | None = None,
        warm_up: Sequence[str] = ("true",),
    ) -> Live:
        rt = self.rt
        tpl = rt.templates.get(config.template)
        be = await rt.backend(config.backend or rt.settings.default_backend)
        res = Resources(cpu=float(config.cpu), memory_mb=config.memory_mb, pids=config.pids,
                        disk_mb=self.boot.disk_limit(None, be))  # fmt: skip
        info = replace(self.boot.new_info(tpl, be.name, res, {}, {}, None, None), source="warm")
        if chain:  # a spare of a layer pool: booted like a restore onto the chain
            live = await self.boot.boot_chain(info, tpl, be, chain, PhaseTimer(), pool=name)
        else:
            live = await self.boot.boot_live(info, tpl, be, PhaseTimer(), pool=rt.pool_key(config.template, be.name))
        # one throw-away command warms the agent's code paths (a forked agent's first exec pays its copy-on-write
        # page faults, ~1 ms here), so the user's first command in a claimed sandbox runs at full speed
        try:
            await live.agent.exec(list(warm_up), timeout=60)
        except BaseException:
            live.pooled = None
            await self.boot.destroy_now(info.id)
            raise
        return live

    async def _close_pool(self, pool: Pool[Live]) -> None:
        for member in await pool.aclose():
            member.pooled = None
            await self.boot.destroy_now(member.info.id)

    # ------------------------------------------------------------------ spares of hot layer chains (git workspaces)
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
        rt = self.rt
        timer = PhaseTimer()
        with timer.phase("validate"):
            env_, meta, ttl = self.lifecycle.check_create_input(env, metadata, timeout, cpu, memory_mb, pids)
            tpl = rt.templates.get(template)
            be = await rt.backend(rt.settings.default_backend)
        if warm:  # a spare booted on this chain ahead of demand: claim it, like a warm pool member
            pool = self._layer_pool(list(layers), tpl.name, list(warm_up))
            member = pool.take() if pool.config.matches(cpu, memory_mb, pids) else None
            if member is not None:
                try:
                    return await self.lifecycle.claim(member, pool, env_, meta, ttl, None, timer,
                                                      pool_name=member.pooled)  # fmt: skip
                except BranchboxError as exc:
                    log.warning("claim of spare %s failed (%s); booting", member.info.id, exc)
                    rt.spawn_bg(self.boot.destroy_now(member.info.id))
        res = Resources(cpu=float(cpu), memory_mb=memory_mb, pids=pids)
        info = replace(self.boot.new_info(tpl, be.name, res, env_, meta, ttl, None), source=source)
        return await self.boot.restore(info, tpl, be, list(layers), timer)

    def _layer_pool(self, chain: builtins.list[str], template: str, warm_up: builtins.list[str]) -> Pool[Live]:
        """The pool of one spare for ``chain`` (created on first use; the least recently used of more than
        ``LAYER_POOLS`` is closed and its spare destroyed)."""
        pools = self.rt.layer_pools
        name = f"layers:{template}:{'+'.join(chain)}"
        pool = pools.pop(name, None)
        if pool is None:
            cfg = PoolConfig(template=template, max_size=1, target_free=1, max_parallel_boots=1)

            async def boot(config: PoolConfig) -> Live:
                return await self.boot_member(config, chain=chain, name=name, warm_up=warm_up)

            pool = Pool(cfg, boot)
            # the first spare boots after the caller's own sandbox, not in competition with it
            asyncio.get_running_loop().call_later(REFILL_DELAY_S, pool.start)
        pools[name] = pool  # most recently used last
        while len(pools) > LAYER_POOLS:
            old = pools.pop(next(iter(pools)))
            self.rt.spawn_bg(self._close_pool(old))
        return pool

    async def wait_layer_spares(self) -> None:
        """Wait until every hot layer chain has its spare booted (for tests and benchmarks: a spare boots in the
        background after the create that made its chain hot, so a second create at once may find none yet)."""
        await asyncio.gather(*(pool.wait_ready() for pool in self.rt.layer_pools.values()))

    def drop_spares(self, layer_id: str) -> None:
        """Close the layer pools whose chain holds ``layer_id`` (their spares would keep it alive)."""
        pools = self.rt.layer_pools
        for name in [n for n in pools if layer_id in n.rsplit(":", 1)[-1].split("+")]:
            self.rt.spawn_bg(self._close_pool(pools.pop(name)))
