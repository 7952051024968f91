"""QEMU processes waiting in ``-incoming defer`` for one saved VM (a memory template): a templated start takes
one, so process start, RAM copy and disk overlay are off the hot path. Refilled in the background at low CPU
priority; slots are plain VMs of the backend (``DATA/vm/run/pool-*``) so orphan cleanup covers them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import branchbox.backends.microvm.qemu as qemu
from branchbox.backends.microvm.qemu import Saved
from branchbox.backends.microvm.qmp import QMP

log = logging.getLogger("branchbox.microvm")


@dataclass(frozen=True, slots=True)
class Slot:
    vmid: str
    pid: int
    started: int
    qmp: QMP


class VmHost(Protocol):
    """What the pool needs of its backend (``MicroVMBackend``): a VM's files, its RAM and disk made ready to
    restore ``saved``, QEMU started waiting for it, and the VM removed."""

    def paths(self, vmid: str) -> qemu.VmPaths: ...

    async def prepare(self, vmid: str, saved: Saved) -> None: ...

    def spawn_vm(self, vmid: str, m: qemu.Machine, *, incoming: bool, nice: int = 0) -> int: ...

    async def remove_vm(self, d: Path) -> None: ...


class IncomingPool:
    def __init__(self, backend: VmHost, saved: Saved, size: int) -> None:
        self.backend = backend
        self.saved = saved
        self.size = size
        self.ready: deque[Slot] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def take(self) -> Slot | None:
        while self.ready:
            slot = self.ready.popleft()
            if qemu.alive(slot.pid, slot.started) and not slot.qmp.closed:
                return slot
            asyncio.get_running_loop().create_task(self._discard(slot))
        return None

    def refill(self) -> None:
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._fill())

    async def wait_ready(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _fill(self) -> None:
        while not self._closed and len(self.ready) < self.size:
            vmid = f"pool-{secrets.token_hex(8)}"
            paths = self.backend.paths(vmid)
            try:
                await self.backend.prepare(vmid, self.saved)
                pid = self.backend.spawn_vm(vmid, self.saved.machine, incoming=True, nice=10)
                started = qemu.start_time(pid) or 0
                (paths.dir / "pid").write_text(f"{pid} {started}\n")
                q = await QMP.connect(paths.qmp)
            except BaseException as exc:  # also cancelled by aclose(): the half-made slot must not stay behind
                if not isinstance(exc, asyncio.CancelledError):
                    log.exception("filling the -incoming pool of %s failed", self.saved.dir.name)
                await self.backend.remove_vm(paths.dir)
                if isinstance(exc, Exception):
                    return
                raise
            if self._closed:
                await q.aclose()
                await self.backend.remove_vm(paths.dir)
                return
            self.ready.append(Slot(vmid, pid, started, q))

    async def _discard(self, slot: Slot) -> None:
        await slot.qmp.aclose()
        await self.backend.remove_vm(self.backend.paths(slot.vmid).dir)

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        while self.ready:
            await self._discard(self.ready.popleft())
