"""Booting and tearing down sandboxes: a record, its directories, the backend's boot, the network and the agent's
connection, registered live and watched; and the way back (timers, cleanup, destroy). Every create, restore,
fork child, reset and pool member boots through :meth:`BootService.boot_live`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from branchbox.backends.base import Backend, BootSpec, IdMap, SandboxHandle
from branchbox.core import disk, identity
from branchbox.core import snapshots as snaps
from branchbox.core.events import ManagerEvent
from branchbox.core.layers import LayerService
from branchbox.core.network import NetworkService
from branchbox.core.runtime import Live, Runtime, new_sandbox_id
from branchbox.errors import BranchboxError
from branchbox.models import Resources, SandboxInfo, SandboxState, TemplateInfo
from branchbox.net import NetworkPolicy
from branchbox.timing import PhaseTimer

log = logging.getLogger("branchbox.manager")


def image_user(tpl: TemplateInfo) -> str | None:
    """An imported image's or a Dockerfile's USER, the default user of its sandboxes' commands (None: root)."""
    return tpl.user if tpl.source in ("image", "dockerfile") and tpl.user not in ("root", "0") else None


class BootService:
    def __init__(self, rt: Runtime, layers: LayerService, network: NetworkService) -> None:
        self.rt = rt
        self.layers = layers
        self.network = network

    def disk_limit(self, requested: int | None, be: Backend, inherited: int | None = None) -> int:
        """A new sandbox's disk limit (core/disk.py): ``requested``, else ``inherited`` (a restore: the snapshot's
        source had it), else the default; 0 where nothing limits it."""
        return disk.resolve(requested, default=self.rt.settings.default_disk_mb, enforcer=self.rt.driver.disk_limits,
                            vm=be.capabilities.memory_snapshot, inherited=inherited)  # fmt: skip

    def new_info(
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

    async def boot_live(
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
    ) -> Live:
        """Boot a sandbox for ``info`` and register it (running, watched). On failure nothing is left.

        ``lowers``: layer ids stacked above the template (topmost first); ``base``: a layer the upper starts as
        a clone of (drivers that clone); ``existing``: the record exists already (reset); ``memory``: a memory
        snapshot layer to continue from (backends with memory snapshots); ``policy``: its network policy (None: the
        default when networking is on)."""
        rt = self.rt
        sid = info.id
        rt.creating.add(sid)
        handle: SandboxHandle | None = None
        try:
            with timer.phase("store"):
                idmap = idmap or rt.idmap_for(sid, be, existing=existing)
                pinned = [base, *lowers] if base is not None else list(lowers)  # nothing frees them meanwhile
                if existing:
                    rt.db.update(sid, state=info.state, layers=pinned, handle=None, error=None)
                else:
                    rt.db.insert(info, pool=pool, layers=pinned, uid_base=idmap.host_base)
                lower_paths = [rt.lower_path(lid) for lid in lowers]
                bases = [*rt.db.layer_uid_bases(lowers), rt.settings.idmap.host_base]  # the template's last
                base_path = None if base is None else rt.layer_path(base)
            with timer.phase("dirs"):
                root = rt.templates.rootfs(tpl.digest)
                dirs = await self.layers.prepare_dirs(sid, base_path, [*lower_paths, root], fresh_machine_id,
                                                      info.resources.disk_mb, idmap, bases)  # fmt: skip
                rt.poke_reserve()  # the group's limit follows the free space, in the background
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
                network=rt.net is not None and be.capabilities.network,
                background=pool is not None,
                memory_snapshot=None if memory is None else rt.layer_path(memory),
            )
            handle = await be.boot(spec, timer)
            if spec.network:
                handle, agent = await self.network.wire_and_connect(be, handle, policy or NetworkPolicy(), timer)
            else:
                with timer.phase("agent_connect"):
                    agent = await rt.connect_agent(be, handle)
            user = image_user(tpl)
            if be.capabilities.agent_session:
                with timer.phase("identity"):
                    await identity.personalise(
                        agent, hostname=info.hostname, env=spec.env, workdir=spec.workdir, user=user
                    )
            elif user is not None:
                await agent.configure(env=spec.env, workdir=spec.workdir, user=user)
            info = replace(info, state=SandboxState.RUNNING, timings=timer.as_dict())
            if base is not None:  # the upper is a clone of base now: only the lowers are used
                rt.db.update(sid, state=info.state, handle=handle, timings=info.timings, layers=list(lowers))
            else:
                rt.db.update(sid, state=info.state, handle=handle, timings=info.timings)
        except BaseException:
            rt.creating.discard(sid)
            await self.cleanup(sid, info.backend, handle)
            with contextlib.suppress(Exception):
                self.layers.forget(sid)
            raise
        rt.creating.discard(sid)
        live = Live(info=info, handle=handle, agent=agent, backend=be, pooled=pool)
        rt.live[sid] = live
        self.watch(live)
        return live

    async def boot_chain(
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
    ) -> Live:
        """Boot on a chain of layers (topmost first); a driver that clones starts the upper as the top layer,
        unless ``stack``: then every layer stays a lower (a fork's children: a btrfs snapshot per child commits a
        transaction, ~4 ms each and one at a time, while stacking one more read-only layer costs nothing)."""
        if be.capabilities.memory_snapshot and chain:  # a VM continues from the top layer (its disk chains down)
            return await self.boot_live(info, tpl, be, timer, lowers=list(chain), memory=chain[0], existing=existing)
        if len(chain) > snaps.MAX_CHAIN:
            with timer.phase("flatten"):
                chain = [await self.layers.flatten_now(chain)]
        rt = self.rt
        idmap = rt.idmap_for(info.id, be, existing=existing)
        # the upper starts as a clone of the top layer only when that layer is owned in the sandbox's own range
        # (a reset to its own snapshot); else every layer is a lower, mounted idmapped where its range differs
        if rt.driver.clones_layers and chain and not stack and rt.db.layer_uid_bases(chain[:1])[0] == idmap.host_base:
            base, lowers = chain[0], list(chain[1:])
        else:
            base, lowers = None, list(chain)
        return await self.boot_live(
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

    async def restore(
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
        (``stack``: see ``boot_chain``)."""
        rt = self.rt
        try:
            live = await self.boot_chain(info, tpl, be, chain, timer, stack=stack, policy=policy)
        except BaseException as exc:
            code = exc.code if isinstance(exc, BranchboxError) else "internal"
            rt.emit(ManagerEvent("create", info.id, info.backend, info.source, "error", timer.total_ms / 1e3,
                                 code=code))  # fmt: skip
            raise
        self.schedule_expiry(live)
        rt.emit(ManagerEvent("create", info.id, info.backend, info.source, "ok", timer.total_ms / 1e3,
                             timings=live.info.timings))  # fmt: skip
        rt.emit_counts()
        return live.info

    # ------------------------------------------------------------------ the way back
    def schedule_expiry(self, live: Live) -> None:
        if live.expiry is not None:
            live.expiry.cancel()
            live.expiry = None
        if live.info.expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, live.info.expires_at - time.time())
        live.expiry = loop.call_at(loop.time() + delay, self._expire, live.info.id)

    def _expire(self, sandbox_id: str) -> None:
        live = self.rt.live.get(sandbox_id)
        if live is not None and live.info.lifecycle.on_timeout == "pause":
            self.rt.spawn_bg(self._pause_on_timeout(live))
            return
        log.info("sandbox %s reached its timeout; destroying it", sandbox_id, extra={"sandbox_id": sandbox_id})
        self.rt.spawn_bg(self.destroy_now(sandbox_id))

    async def _pause_on_timeout(self, live: Live) -> None:
        """``on_timeout="pause"``: the sandbox is paused (or stays paused) and keeps no time to live until it is
        resumed. A pause that fails destroys it, so that nothing runs past its timeout."""
        sid = live.info.id
        log.info("sandbox %s reached its timeout; pausing it", sid, extra={"sandbox_id": sid})
        try:
            if live.info.state is SandboxState.RUNNING:
                await self.pause_live(live)
        except Exception as exc:  # any failure (a backend's OSError too): nothing may run past its timeout
            log.warning("pause on timeout of %s failed (%s); destroying it", sid, exc, extra={"sandbox_id": sid})
            await self.destroy_now(sid)
            return
        if live.destroying or live.info.state is not SandboxState.PAUSED:
            return
        live.info = replace(live.info, expires_at=None)
        self.rt.db.update(sid, expires_at=None)

    async def pause_live(self, live: Live) -> SandboxInfo:
        """Freeze a running sandbox (under its lock; a sandbox being destroyed or no longer running is left)."""
        async with live.lock:
            if live.destroying or live.info.state is not SandboxState.RUNNING:
                return live.info
            await live.backend.pause(live.handle)
            return self.rt.set_state(live, SandboxState.PAUSED)

    def watch(self, live: Live) -> None:
        rt = self.rt

        async def watch() -> None:
            await live.backend.wait_exit(live.handle)
            if live.destroying or rt.closed:
                return
            pool = rt.pool_named(live.pooled)
            if pool is not None:  # a ready member died: forget it, the pool boots a replacement
                log.warning("pool %s: member %s died; replacing it", live.pooled, live.info.id)
                live.destroying = True
                pool.discard(live)
                rt.cancel_timers(live, watcher=False)
                await live.agent.aclose()
                rt.live.pop(live.info.id, None)
                self.layers.forget(live.info.id)
                await self.cleanup(live.info.id, live.info.backend, live.handle)
                return
            log.warning("sandbox %s init exited unexpectedly", live.info.id, extra={"sandbox_id": live.info.id})
            rt.set_state(live, SandboxState.ERROR, "the sandbox's init process exited")
            rt.cancel_timers(live, watcher=False)
            await live.agent.aclose()
            rt.live.pop(live.info.id, None)
            await self.cleanup(live.info.id, live.info.backend, live.handle, keep_record_dir=False)

        live.watcher = asyncio.get_running_loop().create_task(watch())

    async def cleanup(
        self, sandbox_id: str, kind: str, handle: SandboxHandle | None, *, keep_record_dir: bool = False
    ) -> None:
        """Remove everything of one sandbox; never raises for things already gone."""
        rt = self.rt
        try:
            be = await rt.backend(kind)
            await be.destroy(sandbox_id, handle)
        except Exception:
            log.exception("backend cleanup of %s failed", sandbox_id, extra={"sandbox_id": sandbox_id})
            if rt.ids is not None and (rec := rt.db.get(sandbox_id)) is not None:
                rt.ids.hold(rec.uid_base, f"unclean:{sandbox_id}")  # its processes may live: never lend it again
        if rt.net is not None:
            try:
                await rt.net.detach(sandbox_id, handle.extra if handle is not None else None)
            except Exception:
                log.exception("network cleanup of %s failed", sandbox_id, extra={"sandbox_id": sandbox_id})
        if not keep_record_dir:
            await asyncio.to_thread(rt.driver.remove_sandbox, rt.sandbox_dir(sandbox_id))

    async def destroy_now(self, sandbox_id: str) -> None:
        """Destroy a live sandbox (or pool member) now; nothing when it is gone or going already."""
        rt = self.rt
        live = rt.live.get(sandbox_id)
        if live is None or live.destroying:
            return
        live.destroying = True
        rt.cancel_timers(live)
        await live.agent.aclose()
        try:
            await self.cleanup(sandbox_id, live.info.backend, live.handle)
        finally:
            rt.live.pop(sandbox_id, None)
            self.layers.forget(sandbox_id)
            rt.emit_counts()
            pool = rt.pool_named(live.from_pool)
            if pool is not None:
                # golden reset: nothing of the released sandbox is kept (processes, upper layer, /tmp, env);
                # the pool refills with a pristine member right away
                pool.released(recycled=pool.config.reuse)
