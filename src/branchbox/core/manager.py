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
described in docs/snapshots.md. Git workspaces (docs/workspaces.md) are sandboxes booted on cached commit layers
(``create_on_layers``); their service lives above core (``branchbox.workspaces``) and is added to a Manager
(:meth:`Manager.add_service`), which then starts and closes it in order with its own services.

The Manager is a facade: each command is a method of one service, and the services share one
:class:`~branchbox.core.runtime.Runtime`, the only owner of the state (records, live sandboxes, pools, events):

=============================  ======================================================================
``core/lifecycle.py``          create (cold, warm, restore), get, list, set_timeout, pause, resume, destroy
``core/boot.py``               booting a sandbox (record, dirs, backend, network, agent), watch, cleanup
``core/sandbox_calls.py``      exec, spawn, attach, processes, files (through the agent); the liveness watchdog
``core/snapshotting.py``       snapshot, list/get/delete_snapshot, fork, reset
``core/layers.py``             layer capture, flatten, measure, pins, garbage collection
``core/warmpools.py``          warm pools, the spares of hot layer chains (``create_on_layers``)
``core/network.py``            egress policies, wiring a sandbox's network, get/update_network
``core/recovery.py``           the reconcile after a (re)start
=============================  ======================================================================
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Collection, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from branchbox.backends.base import Backend
from branchbox.core import disk
from branchbox.core.boot import BootService
from branchbox.core.events import Subscriber
from branchbox.core.layers import LayerService
from branchbox.core.lifecycle import Lifecycle
from branchbox.core.network import NetworkService
from branchbox.core.pool import Pool
from branchbox.core.recovery import reconcile
from branchbox.core.runtime import Live, Runtime
from branchbox.core.sandbox_calls import SandboxCalls
from branchbox.core.settings import ManagerSettings
from branchbox.core.snapshotting import SnapshotService
from branchbox.core.store import Store
from branchbox.core.warmpools import WarmPools
from branchbox.errors import InvalidStateError
from branchbox.images.store import TemplateStore
from branchbox.models import TemplateInfo
from branchbox.net import Network
from branchbox.storage.base import StorageDriver
from branchbox.storage.select import make_driver

log = logging.getLogger("branchbox.manager")


class ManagedService(Protocol):
    """A service built above core on a Manager (the git workspaces: ``branchbox.workspaces.WorkspaceService``),
    started and closed by the Manager in order with its own (:meth:`Manager.add_service`)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


S = TypeVar("S", bound=ManagedService)


class Manager:
    """In-process core. Use ``async with Manager.open(settings) as m``, or with services added above core (the git
    workspaces): ``m = Manager(settings)``, ``ws = m.add_service(WorkspaceService(m))``, then ``async with m``."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        backends: Mapping[str, Backend] | None = None,
        storage: StorageDriver | str = "auto",
    ) -> None:
        self.settings = settings
        self._rt = rt = Runtime(settings, backends=backends, storage=storage)
        self.templates: TemplateStore = rt.templates
        self._layers = layers = LayerService(rt)
        net = NetworkService(rt)
        self._boot = boot = BootService(rt, layers, net)
        life = Lifecycle(rt, boot, net)
        self._calls = calls = SandboxCalls(rt, wake=life.resume)
        snaps = SnapshotService(rt, boot, net)
        self._warm = warm = WarmPools(rt, life)
        # the commands (docstrings on the services)
        self.create = life.create
        self.get = life.get
        self.list = life.list
        self.set_timeout = life.set_timeout
        self.pause = life.pause
        self.resume = life.resume
        self.destroy = life.destroy
        self.awake = calls.awake
        self.exec = calls.exec
        self.spawn = calls.spawn
        self.attach = calls.attach
        self.list_processes = calls.list_processes
        self.kill_process = calls.kill_process
        self.read_file = calls.read_file
        self.download = calls.download
        self.download_archive = calls.download_archive
        self.write_file = calls.write_file
        self.upload = calls.upload
        self.upload_archive = calls.upload_archive
        self.list_files = calls.list_files
        self.stat = calls.stat
        self.mkdir = calls.mkdir
        self.remove = calls.remove
        self.rename = calls.rename
        self.watch_dir = calls.watch_dir
        self.open_agent_calls = calls.open_agent_calls
        self.snapshot = snaps.snapshot
        self.list_snapshots = snaps.list_snapshots
        self.get_snapshot = snaps.get_snapshot
        self.delete_snapshot = snaps.delete_snapshot
        self.fork = snaps.fork
        self.reset = snaps.reset
        self.get_network = net.get_network
        self.update_network = net.update_network
        self.loopback_socket = net.loopback_socket
        self.pool_statistics = warm.pool_statistics
        self.configure_pool = warm.configure_pool
        self.remove_pool = warm.remove_pool
        self.wait_pool_ready = warm.wait_pool_ready
        self.create_on_layers = warm.create_on_layers
        self.wait_layer_spares = warm.wait_layer_spares
        self.drop_spares = warm.drop_spares
        self.layer_path = rt.layer_path  # where a layer lives (``DATA/layers/<id>``)
        self.lower_path = rt.lower_path  # the directory of a layer that an overlay mounts as a lower
        self.add_pinned_layer = layers.add_pinned_layer
        self.pin_layers = layers.pin_layers
        self.layer_uid_bases = layers.layer_uid_bases
        self.unpin_layers = layers.unpin_layers
        self.state_counts = rt.state_counts
        self.disk_pressure = rt.disk_pressure
        self._services: builtins.list[ManagedService] = []
        self._started = False

    def add_service(self, service: S) -> S:
        """Start ``service`` with this Manager (after its recovery, before its warm pools: the service may rely on
        recovered sandboxes and layers, and pins what it keeps before spares are made) and close it first (before
        the warm pools and sandboxes), services in the reverse order of adding. Only before the Manager starts."""
        if self._started:
            raise InvalidStateError("add services before the Manager starts: Manager(settings), add_service(...), "
                                    "then `async with manager`")  # fmt: skip
        self._services.append(service)
        return service

    # ------------------------------------------------------------------ lifecycle of the Manager
    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: ManagerSettings | Path | str | None = None) -> AsyncIterator[Manager]:
        if settings is None:
            settings = ManagerSettings()
        elif not isinstance(settings, ManagerSettings):
            settings = ManagerSettings(data_dir=Path(settings))
        async with cls(settings) as m:
            yield m

    async def __aenter__(self) -> Manager:
        try:
            await self.start()
        except BaseException:
            await self.aclose()  # a failed start (bad pool config, ...) still releases what it made
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        s, rt = self.settings, self._rt
        self._started = True
        # private: state, uppers and layers hold sandboxes' files (setuid ones of the sandbox uid range too); the
        # zygote passes layers to sandboxes as open fds, QEMU sees its files through its jail
        for d in (s.data_dir, s.data_dir / "sandboxes", s.data_dir / "layers"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        choice = rt.storage_choice
        rt.storage = make_driver(choice, s.data_dir) if isinstance(choice, str) else choice
        rt.reserve = disk.ReserveKeeper(rt.storage.keep_free, s.reserve_mb)
        try:
            await asyncio.to_thread(rt.reserve.refresh_now)
        except OSError as exc:
            log.warning("keeping the disk reserve failed: %s", exc)
        rt.store = Store(s.data_dir / "state.db")
        await rt.backend(s.default_backend)
        if s.network is not None:
            rt.net = Network(s.network)
            await rt.net.start()
        await self._warm.open_configured()
        await reconcile(rt, self._boot)
        for service in self._services:
            await service.start()
        self._warm.start()

    async def aclose(self) -> None:
        rt = self._rt
        if rt.closed:
            return
        rt.closed = True
        await self._calls.liveness.aclose()
        if rt.reserve is not None:
            await rt.reserve.aclose()
        for service in reversed(self._services):
            await service.aclose()
        await self._warm.aclose()
        if not self.settings.keep_sandboxes_on_shutdown:
            await asyncio.gather(*(self._boot.destroy_now(sid) for sid in list(rt.live)), return_exceptions=True)
        for live in list(rt.live.values()):
            rt.cancel_timers(live)
            await live.agent.aclose()
        rt.live.clear()
        if rt.background:
            await asyncio.gather(*rt.background, return_exceptions=True)
        if rt.net is not None:
            await rt.net.aclose()
        for b in rt.backends.values():
            await b.aclose()
        if rt.store is not None:
            rt.store.close()

    def subscribe(self, fn: Subscriber, *, kinds: Collection[str] | None = None) -> None:
        """Call ``fn`` with each event of ``kinds`` (default: every kind), soon after it happened
        (:mod:`branchbox.core.events`). Sandboxes are counted by state for ``state`` events only when a subscriber
        wants them."""
        self._rt.events.subscribe(fn, kinds)

    async def wait_background(self) -> None:
        """Wait until background work started so far (layer removal, flattening, size measurement) is done."""
        while pending := [t for t in self._rt.background if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def list_templates(self) -> builtins.list[TemplateInfo]:
        return self.templates.list()

    @property
    def storage_driver(self) -> str:
        return self._rt.driver.name

    # ------------------------------------------------------------------ for tests and benchmarks
    @property
    def _live(self) -> dict[str, Live]:
        return self._rt.live

    @property
    def _pools(self) -> dict[str, Pool[Live]]:
        return self._rt.pools

    @property
    def _net(self) -> Network | None:
        return self._rt.net

    @property
    def _backends(self) -> dict[str, Backend]:
        return self._rt.backends

    @property
    def _driver(self) -> StorageDriver:
        return self._rt.driver

    def _sandbox_dir(self, sandbox_id: str) -> Path:
        return self._rt.sandbox_dir(sandbox_id)


__all__ = ["Manager"]
