"""Snapshot layers: capture (freeze, turn the upper into a durable layer, thaw), flatten, measure, pin and collect.

Layers live in ``DATA/layers/<id>`` and are refcounted in SQLite by the snapshots, sandboxes and pins (git
workspaces) that use them; one nobody references is removed in the background (:meth:`LayerService.schedule_gc`).
docs/snapshots.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from branchbox.backends.base import IdMap, MemorySnapshots
from branchbox.core import snapshots as snaps
from branchbox.core.runtime import Live, Runtime
from branchbox.core.store import LayerRecord
from branchbox.errors import ConflictError, InvalidStateError, NotSupportedError, SandboxNotFoundError
from branchbox.models import SandboxState, SnapshotInfo
from branchbox.storage.base import SandboxDirs
from branchbox.storage.fsutil import disk_usage_niced
from branchbox.timing import PhaseTimer

log = logging.getLogger("branchbox.manager")
MEASURE_QUIET_S = 0.5  # layer sizes are measured once no snapshot was taken for this long


class LayerService:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_again = False
        self._measuring = asyncio.Lock()  # one layer measurement at a time ...
        self._last_capture = 0.0  # ... and none until captures have paused for MEASURE_QUIET_S

    async def capture(self, live: Live, name: str | None, timer: PhaseTimer, *, hidden: bool) -> SnapshotInfo:
        """Freeze the sandbox, turn its upper into a durable layer, thaw; record layer + snapshot durably."""
        rt = self.rt
        sid = live.info.id
        memory = isinstance(live.backend, MemorySnapshots) and live.backend.capabilities.memory_snapshot
        if rt.settings.tmp_tmpfs_mb and not memory:
            raise NotSupportedError(
                f"sandbox {sid} keeps /tmp in memory (tmp_tmpfs_mb = {rt.settings.tmp_tmpfs_mb} in this daemon's "
                "settings), which a snapshot or fork of files cannot capture: set tmp_tmpfs_mb = 0 to keep /tmp on "
                "the sandbox's disk"
            )
        async with live.lock:
            if live.destroying or live.info.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                raise InvalidStateError(f"sandbox {sid} is {live.info.state.value}", state=live.info.state.value)
            rec = rt.db.get(sid)
            lowers = rec.layers if rec is not None else ()
            lid = snaps.new_layer_id()
            dest = rt.layer_path(lid)
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
                        upper = rt.driver.upper_dir(rt.sandbox_dir(sid))
                        layer = await asyncio.to_thread(rt.driver.freeze_upper, upper, dest, durable=not hidden)
            except BaseException as exc:
                await asyncio.to_thread(rt.driver.remove_layer, dest)
                if live.destroying:
                    raise SandboxNotFoundError(f"sandbox {sid} was destroyed during the snapshot") from exc
                raise
            finally:
                if running and not live.destroying:
                    with timer.phase("thaw"):
                        await live.backend.resume(live.handle)
            if live.destroying:  # destroyed meanwhile: its lowers may be freed already
                await asyncio.to_thread(rt.driver.remove_layer, dest)
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
            driver=rt.driver.name,
            size_bytes=layer.size_bytes,
            files=layer.files,
        )
        try:
            with timer.phase("store"), rt.db.durable() if not hidden else contextlib.nullcontext():
                owner = rec.uid_base if rec is not None else rt.settings.idmap.host_base  # the writer's range
                rt.db.insert_layer(LayerRecord(lid, dest, lowers[0] if lowers else None, rt.driver.name,
                                               layer.size_bytes, layer.files, now, owner))  # fmt: skip
                rt.db.insert_snapshot(replace(snap, timings=timer.as_dict()), hidden=hidden,
                                      disk_mb=live.info.resources.disk_mb)  # fmt: skip
        except Exception as exc:
            await asyncio.to_thread(rt.driver.remove_layer, dest)
            if name is not None and rt.db.get_snapshot(name, hidden=True) is not None:
                raise ConflictError(f"a snapshot named {name!r} exists already: pick another name") from exc
            raise
        if layer.size_bytes is None and not hidden:  # a fork's layer: no snapshot reports it, and walking its
            rt.spawn_bg(self.measure(lid, dest))  # files would compete with the children's boots
        if not hidden and len(snap.layers) > snaps.FLATTEN_DEPTH and not live.backend.capabilities.memory_snapshot:
            rt.spawn_bg(self.flatten_bg(snap))
        return replace(snap, timings=timer.as_dict())

    async def prepare_dirs(
        self, sid: str, base: Path | None, lowers: Sequence[Path], machine_id: bool, disk_mb: int = 0,
        idmap: IdMap | None = None, bases: Sequence[int] = (),
    ) -> SandboxDirs:  # fmt: skip
        rt = self.rt
        idmap = idmap or rt.settings.idmap

        def prepare() -> SandboxDirs:
            # disk_mb: btrfs sets it (and the daemon's disk group) by the ioctl that makes the upper
            dirs = rt.driver.prepare_sandbox(rt.sandbox_dir(sid), idmap, base=base, disk_mb=disk_mb)
            if machine_id:
                snaps.write_machine_id(dirs.upper, lowers, idmap, bases)
            return dirs

        if base is None:  # a few mkdirs (a subvolume on btrfs: ~0.1 ms) and a machine-id: cheaper than a thread hop
            return prepare()
        return await asyncio.to_thread(prepare)  # a clone of ``base``: a btrfs snapshot commits a transaction

    async def flatten_now(self, chain: Sequence[str]) -> str:
        """Merge ``chain`` into a new layer and record it (unreferenced: the caller must reference it at once)."""
        rt = self.rt
        lid = snaps.new_layer_id()
        dest = rt.layer_path(lid)
        paths = [rt.lower_path(x) for x in chain]
        try:
            layer = await asyncio.to_thread(snaps.flatten_canonical, rt.driver, paths, dest,
                                            rt.db.layer_uid_bases(chain), rt.settings.idmap)  # fmt: skip
        except BaseException:
            await asyncio.to_thread(rt.driver.remove_layer, dest)
            raise
        with rt.db.durable():
            rt.db.insert_layer(LayerRecord(lid, dest, None, rt.driver.name, layer.size_bytes, layer.files,
                                           time.time()))  # fmt: skip
        return lid

    async def flatten_bg(self, snap: SnapshotInfo) -> None:
        """Replace a deep snapshot chain by one flat layer; living children keep the old layers they use."""
        rt = self.rt
        lid = snaps.new_layer_id()
        dest = rt.layer_path(lid)
        paths = [rt.lower_path(x) for x in snap.layers]
        try:
            layer = await asyncio.to_thread(snaps.flatten_canonical, rt.driver, paths, dest,
                                            rt.db.layer_uid_bases(snap.layers), rt.settings.idmap)  # fmt: skip
        except Exception:
            log.exception("flattening snapshot %s failed; it keeps its chain", snap.id)
            await asyncio.to_thread(rt.driver.remove_layer, dest)
            return
        cur = rt.db.get_snapshot(snap.id, hidden=True)
        if cur is None or cur.layers != snap.layers or rt.closed:
            await asyncio.to_thread(rt.driver.remove_layer, dest)
            return
        with rt.db.durable():
            rt.db.insert_layer(LayerRecord(lid, dest, None, rt.driver.name, layer.size_bytes, layer.files,
                                           time.time()))  # fmt: skip
            rt.db.set_snapshot_layers(snap.id, [lid])
        self.schedule_gc()

    async def measure(self, layer_id: str, path: Path) -> None:
        """Measure a layer in the background: one at a time, after captures have paused (a walk of 20k files
        running during a snapshot contends with its btrfs commit and fsyncs: 2-3x slower snapshots)."""
        async with self._measuring:
            while (wait := self._last_capture + MEASURE_QUIET_S - time.monotonic()) > 0:  # noqa: ASYNC110 - a debounce
                await asyncio.sleep(wait)
            try:
                usage = await disk_usage_niced(path)
            except OSError:
                return
        if self.rt.db.get_layer(layer_id) is not None and not self.rt.closed:
            self.rt.db.set_layer_usage(layer_id, usage.size_bytes, usage.files)

    def forget(self, sandbox_id: str) -> None:
        """Delete a sandbox record; layers only it used are freed in the background."""
        self.rt.db.delete(sandbox_id)
        if self.rt.ids is not None:
            self.rt.ids.release(sandbox_id)
        self.schedule_gc()

    def schedule_gc(self) -> None:
        if self._gc_task is not None and not self._gc_task.done():
            self._gc_again = True
            return
        self._gc_task = self.rt.spawn_bg(self._gc())

    async def _gc(self) -> None:
        """Remove layers that no snapshot and no sandbox references (row first: a crash leaves an orphan dir)."""
        rt = self.rt
        while True:
            self._gc_again = False
            for layer in rt.db.unreferenced_layers():
                rt.db.delete_layer(layer.id)
                try:
                    await asyncio.to_thread(rt.driver.remove_layer, layer.path)
                except OSError:
                    log.exception("removing layer %s failed", layer.id)
            if not self._gc_again:
                return

    async def reconcile(self) -> None:
        """After a restart: drop hidden snapshots of interrupted forks, orphan layer dirs, unmeasured sizes."""
        rt = self.rt
        visible = {s.id for s in rt.db.snapshots()}
        for s in rt.db.snapshots(hidden=True):
            if s.id not in visible:
                rt.db.delete_snapshot(s.id)
        layers = rt.db.all_layers()
        known = {x.id for x in layers}
        for d in (rt.settings.data_dir / "layers").iterdir():
            if d.name not in known:
                await asyncio.to_thread(rt.driver.remove_layer, d)
        for x in layers:
            if x.size_bytes is None:
                rt.spawn_bg(self.measure(x.id, x.path))
        self.schedule_gc()

    # ------------------------------------------------------------------ layers kept by caches (git workspaces)
    def add_pinned_layer(self, layer_id: str, owner: str, *, below: Sequence[str] = ()) -> None:
        """Record the finished layer at ``layer_path(layer_id)`` durably, kept alive (with the layers ``below``
        it) by the pin ``owner``."""
        rt = self.rt
        with rt.db.durable():
            rt.db.insert_layer(LayerRecord(layer_id, rt.layer_path(layer_id), below[0] if below else None,
                                           rt.driver.name, None, None, time.time()))  # fmt: skip
            for lid in (layer_id, *below):
                rt.db.pin_layer(lid, owner)
        rt.spawn_bg(self.measure(layer_id, rt.layer_path(layer_id)))

    def layer_uid_bases(self, layer_ids: Sequence[str]) -> list[int]:
        """The host uid range each layer's files are owned in (its writer's; flattened and cached ones: canonical)."""
        return self.rt.db.layer_uid_bases(layer_ids)

    def pin_layers(self, layers: Sequence[str], owner: str) -> None:
        """Keep the recorded ``layers`` (a snapshot's chain) alive under the pin ``owner``."""
        with self.rt.db.durable():
            for lid in layers:
                self.rt.db.pin_layer(lid, owner)

    def unpin_layers(self, owner: str) -> None:
        """Drop the pins of ``owner``; its layers go once no sandbox uses them."""
        self.rt.db.unpin_layers(owner)
        self.schedule_gc()
