"""The snapshot commands: snapshot, list/get/delete a snapshot, fork, reset (restores are creates with
``snapshot=``, in ``core/lifecycle.py``). docs/snapshots.md."""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import replace

from branchbox.backends.base import HostIdRanges
from branchbox.core import disk, validate
from branchbox.core import snapshots as snaps
from branchbox.core.boot import BootService
from branchbox.core.events import ManagerEvent
from branchbox.core.network import NetworkService
from branchbox.core.runtime import Runtime
from branchbox.errors import BackendError, BranchboxError, ConflictError, InvalidStateError, NotSupportedError
from branchbox.models import SandboxInfo, SandboxState, SnapshotInfo
from branchbox.timing import PhaseTimer


class SnapshotService:
    def __init__(self, rt: Runtime, boot: BootService, network: NetworkService) -> None:
        self.rt = rt
        self.boot = boot
        self.layers = boot.layers
        self.network = network

    async def snapshot(self, sandbox_id: str, *, name: str | None = None) -> SnapshotInfo:
        """Capture the sandbox's files as an immutable, durable snapshot. The sandbox keeps running."""
        timer = PhaseTimer()
        name = snaps.snapshot_name(name)
        live = self.rt.require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        if name is not None and self.rt.db.get_snapshot(name, hidden=True) is not None:
            raise ConflictError(f"a snapshot named {name!r} exists already: pick another name or delete it first")
        disk.check_reserve(self.rt.settings.data_dir, self.rt.settings.reserve_mb, "snapshot")
        disk.check_snapshot_budget(self.rt.db.snapshot_bytes(), self.rt.settings.snapshot_budget_mb)
        self.rt.poke_reserve()
        snap = await self.layers.capture(live, name, timer, hidden=False)
        self.rt.emit(ManagerEvent("snapshot", sandbox_id, live.info.backend, seconds=timer.total_ms / 1e3,
                                  timings=snap.timings))  # fmt: skip
        return snap

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return self.rt.db.snapshots()

    async def get_snapshot(self, id_or_name: str) -> SnapshotInfo:
        return self.rt.snapshot_or_raise(id_or_name)

    async def delete_snapshot(self, id_or_name: str) -> None:
        """Delete a snapshot; its layers go once no other snapshot or sandbox uses them (children keep theirs)."""
        snap = self.rt.snapshot_or_raise(id_or_name)
        with self.rt.db.durable():
            self.rt.db.delete_snapshot(snap.id)
        self.layers.schedule_gc()

    async def fork(self, sandbox_id: str, count: int = 1) -> builtins.list[SandboxInfo | BranchboxError]:
        """``count`` new sandboxes continuing from the sandbox's current files (not its processes).

        Returns one result per child, in order: its SandboxInfo or the error that child met."""
        rt = self.rt
        timer = PhaseTimer()
        live = rt.require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        if not live.backend.capabilities.fork:
            raise NotSupportedError(f"backend {live.backend.name} cannot fork sandboxes")
        snaps.fork_count(count, rt.settings.max_sandboxes - len(rt.live) - len(rt.creating))
        disk.check_reserve(rt.settings.data_dir, rt.settings.reserve_mb, "fork")
        if rt.ids is not None and isinstance(live.backend, HostIdRanges):
            rec = rt.db.get(sandbox_id)  # the children's idmappings of its range, made during the capture
            ahead = live.backend.prepare_idmaps(rec.uid_base, count) if rec is not None else None
            if ahead is not None:
                rt.background.add(ahead)
                ahead.add_done_callback(rt.background.discard)
        snap = await self.layers.capture(live, None, timer, hidden=True)
        snap_ms = timer.total_ms
        parent = live.info
        ttl = validate.timeout(None, default=rt.settings.default_timeout, maximum=rt.settings.max_timeout)
        policy = self.network.policy_of(sandbox_id)

        async def child() -> SandboxInfo:
            t = PhaseTimer()
            t.add("snapshot", snap_ms)
            tpl = rt.templates.get(snap.template_digest)
            info = replace(
                self.boot.new_info(tpl, parent.backend, parent.resources, parent.env, parent.metadata, ttl, None),
                source="fork",
            )
            return await self.boot.restore(info, tpl, live.backend, snap.layers, t, stack=True, policy=policy)

        try:
            results = await asyncio.gather(*(child() for _ in range(count)), return_exceptions=True)
        finally:
            rt.db.delete_snapshot(snap.id)  # the children's records keep the layers they use
            self.layers.schedule_gc()
        out: builtins.list[SandboxInfo | BranchboxError] = []
        for r in results:
            if isinstance(r, BranchboxError | SandboxInfo):
                out.append(r)
            elif isinstance(r, asyncio.CancelledError):
                raise r
            else:
                out.append(BackendError(f"fork child of {sandbox_id} failed: {r!r}"))
        ok = sum(isinstance(r, SandboxInfo) for r in out)
        rt.emit(ManagerEvent("fork", sandbox_id, parent.backend, outcome="ok" if ok == count else "error",
                             seconds=timer.total_ms / 1e3))  # fmt: skip
        return out

    async def reset(self, sandbox_id: str, snapshot: str | None = None) -> SandboxInfo:
        """Back to its template (or to ``snapshot``), keeping id, hostname, env, metadata and TTL.

        Processes, the upper layer and /tmp are discarded and the sandbox boots again; it comes back running.
        If that boot fails the sandbox is gone (its record is removed) and the error is raised."""
        rt = self.rt
        timer = PhaseTimer()
        live = rt.require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        snap = None if snapshot is None else rt.snapshot_or_raise(snapshot)
        tpl = rt.templates.get(snap.template_digest if snap is not None else live.info.template_digest)
        async with live.lock:
            if live.destroying:
                raise InvalidStateError(f"sandbox {sandbox_id} is being destroyed", state=live.info.state.value)
            live.destroying = True
            rt.cancel_timers(live)
            rt.creating.add(sandbox_id)
            # pin the chain to boot on in the record now: nothing can free those layers during the teardown
            chain = list(snap.layers) if snap is not None else []
            rt.db.update(sandbox_id, state=SandboxState.CREATING, layers=chain)
            policy = self.network.policy_of(sandbox_id)
            with timer.phase("teardown"):
                rt.live.pop(sandbox_id, None)
                await live.agent.aclose()
                await self.boot.cleanup(sandbox_id, live.info.backend, live.handle)
        info = replace(live.info, state=SandboxState.CREATING, timings={}, error=None)
        if snap is not None:
            new = await self.boot.boot_chain(info, tpl, live.backend, snap.layers, timer, existing=True, policy=policy)
        else:
            new = await self.boot.boot_live(info, tpl, live.backend, timer, existing=True, policy=policy)
        new.from_pool = live.from_pool
        self.boot.schedule_expiry(new)
        rt.emit_counts()
        return new.info
