"""After a (re)start: match the store with reality. Sandboxes whose init still runs are re-attached (agent,
timers, watcher, network, pool membership), dead ones are marked ``error``, half-made creates and orphans
(cgroups, veths, sandbox and layer dirs) are removed. docs/architecture.md, "Durability and recovery"."""

from __future__ import annotations

import asyncio
import logging

from branchbox.agentclient.client import AgentClient
from branchbox.backends.base import Backend, SandboxHandle
from branchbox.core.boot import BootService
from branchbox.core.runtime import ACTIVE, Live, Runtime
from branchbox.errors import BranchboxError
from branchbox.models import SandboxState

log = logging.getLogger("branchbox.manager")


async def reconcile(rt: Runtime, boot: BootService) -> None:
    """Match the store with reality after a (re)start: re-attach, mark dead, remove orphans."""
    layers = boot.layers
    for rec in list(rt.db.all()):
        info = rec.info
        if info.state not in ACTIVE:
            continue
        be = await rt.backend(info.backend)
        alive = rec.handle is not None and info.state is not SandboxState.CREATING and be.is_alive(rec.handle)
        if not alive or rec.handle is None:
            if info.state is SandboxState.CREATING or rec.pool is not None:
                await boot.cleanup(info.id, info.backend, rec.handle)
                layers.forget(info.id)
            else:
                await boot.cleanup(info.id, info.backend, rec.handle)
                rt.db.update(info.id, state=SandboxState.ERROR, error="the sandbox died while the daemon was down")
            continue
        try:
            agent = await reattach_agent(rt, be, rec.handle, paused=info.state is SandboxState.PAUSED)
        except Exception as exc:
            log.warning("cannot re-attach sandbox %s: %s", info.id, exc, extra={"sandbox_id": info.id})
            await boot.cleanup(info.id, info.backend, rec.handle)
            rt.db.update(info.id, state=SandboxState.ERROR, error=f"could not re-attach its agent: {exc}")
            continue
        pool = rt.pools.get(rec.pool) if rec.pool else None
        if rec.pool is not None and (pool is None or pool.config.template != info.template
                                     or pool.config.backend != info.backend
                                     or not pool.config.matches(info.resources.cpu, info.resources.memory_mb,
                                                                info.resources.pids)):  # fmt: skip
            await agent.aclose()  # a member of a pool that is gone or changed
            await boot.cleanup(info.id, info.backend, rec.handle)
            layers.forget(info.id)
            continue
        live = Live(info=info, handle=rec.handle, agent=agent, backend=be, pooled=rec.pool)
        if rt.net is not None:
            try:
                rt.net.restore(info.id, rec.handle.extra)
            except BranchboxError as exc:  # it keeps running without egress (its veth is not owned)
                log.warning("cannot restore the network of %s: %s", info.id, exc, extra={"sandbox_id": info.id})
        rt.live[info.id] = live
        boot.watch(live)
        if pool is not None:
            pool.ready.append(live)
        else:
            boot.schedule_expiry(live)
    keep = set(rt.live)
    for be in list(rt.backends.values()):
        await be.cleanup_orphans(keep)
    if rt.net is not None:
        await rt.net.remove_orphans()
    known = {rec.info.id for rec in rt.db.all()}
    for d in (rt.settings.data_dir / "sandboxes").iterdir():
        if d.name not in known:
            await asyncio.to_thread(rt.driver.remove_sandbox, d)
    await layers.reconcile()
    rt.emit_counts()


async def reattach_agent(rt: Runtime, be: Backend, handle: SandboxHandle, *, paused: bool) -> AgentClient:
    """Connect to a sandbox's agent after a restart. A frozen agent sends no HELLO: a sandbox the daemon froze
    for a snapshot or fork when it died is still frozen (its record says running) and is thawed; a paused one
    is thawed just long enough for the HELLO, then frozen again."""
    if be.capabilities.pause:
        try:
            await be.resume(handle)
        except Exception as exc:  # never fatal here: the connect below says what is wrong
            log.warning("cannot thaw %s: %s", handle.sandbox_id, exc, extra={"sandbox_id": handle.sandbox_id})
    agent = await rt.connect_agent(be, handle)
    if paused and be.capabilities.pause:
        try:
            await be.pause(handle)
        except BaseException:
            await agent.aclose()
            raise
    return agent
