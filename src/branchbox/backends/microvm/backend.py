"""The microVM backend: one QEMU ``microvm`` per sandbox, memory templates, memory snapshots. See docs/microvm.md.

Every VM's RAM is a file on tmpfs mapped ``share=on``, so device state can be saved with ``x-ignore-shared``
(tens of KB, milliseconds) and a VM restored by copying the RAM file (sparse: only touched pages) and loading the
device state into a QEMU waiting in ``-incoming defer``. A template's first create boots a *template VM* once and
saves it; every later create of that template (same vCPUs and memory) is such a restore: a templated start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import branchbox.backends.microvm.accel as accel_mod
import branchbox.backends.microvm.image as image
import branchbox.backends.microvm.memfile as memfile
import branchbox.backends.microvm.qemu as qemu
import branchbox.backends.microvm.runtime as runtime
import branchbox.backends.microvm.tplcache as tplcache
import branchbox.backends.microvm.vsock as vsock
from branchbox.agent.wire import VsockAddress
from branchbox.agentclient.client import AgentClient
from branchbox.backends.base import BootSpec, Capabilities, LayerInfo, SandboxHandle
from branchbox.backends.microvm.jail import Jail, JailConfig, Launch
from branchbox.backends.microvm.qemu import Saved
from branchbox.backends.microvm.qmp import QMP
from branchbox.backends.microvm.vmpool import IncomingPool, Slot
from branchbox.errors import BackendError, BranchboxError, NotSupportedError
from branchbox.timing import PhaseTimer

log = logging.getLogger("branchbox.microvm")

MIGRATION_TIMEOUT = 60.0
VSOCK_RETRY_S = 0.02  # between connects to a booting guest's vsock port
WARM_UP_EXECS = 2  # commands a warm pool member runs under TCG before it is ready (see warm_up)
_CAPS = [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]


@dataclass(frozen=True, slots=True)
class MicroVMConfig:
    data_dir: Path
    cache_dir: Path  # kernel, initrd, ext4 images, memory templates' disks (shared by data dirs is fine)
    templated: bool = True  # creates restore a memory template instead of booting
    pool_size: int = 1  # QEMU processes kept waiting in -incoming defer per memory template
    boot_timeout: float = 120.0  # cold boot to agent HELLO (TCG is slow)
    tcg_aslr: bool | None = None  # keep guest ASLR under TCG; None: only on QEMU >= 10 (see accel.keeps_aslr)
    agent_channel: str = "auto"  # "vsock" | "serial" | "auto": vsock when the host has vhost-vsock (vsock.probe)
    jail: JailConfig = dataclasses.field(
        default_factory=JailConfig
    )  # every QEMU's uid, cgroup and mount namespace (jail.py)


def _machine_json(m: qemu.Machine) -> dict[str, Any]:
    return {"vcpus": m.vcpus, "memory_mb": m.memory_mb, "accel": m.accel, "kernel": str(m.kernel),
            "initrd": str(m.initrd), "cmdline": m.cmdline, "agent": m.agent,
            "runtime": str(m.runtime) if m.runtime is not None else None}  # fmt: skip


def _machine_from(d: dict[str, Any]) -> qemu.Machine:
    return qemu.Machine(vcpus=int(d["vcpus"]), memory_mb=int(d["memory_mb"]), accel=str(d["accel"]),
                        kernel=Path(d["kernel"]), initrd=Path(d["initrd"]), cmdline=str(d["cmdline"]),
                        agent=str(d.get("agent", "serial")),
                        runtime=Path(d["runtime"]) if d.get("runtime") else None)  # fmt: skip


class MicroVMBackend:
    name = "microvm"
    capabilities = Capabilities(pause=True, fs_snapshot=True, memory_snapshot=True, fork=True, agent_session=True)

    def __init__(self, config: MicroVMConfig) -> None:
        self.config = config
        self.run_root = config.data_dir / "vm" / "run"
        self.shm = memfile.shm_root(config.data_dir)  # RAM files of this data dir's VMs
        self.template_shm = memfile.shm_root(config.cache_dir, "branchbox-templates")  # memory templates' RAM
        self._guest: image.GuestImages | None = None
        self._runtime: Path | None = None  # the agent's runtime disk (runtime.py)
        self._accel: accel_mod.Accel | None = None
        self._channel = "serial"
        self._aslr = False
        self._qmp: dict[str, QMP] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pools: dict[str, IncomingPool] = {}
        self._started = False
        self.jail = Jail(config.jail)

    # ------------------------------------------------------------------ host-wide
    async def start(self) -> None:
        self.run_root.mkdir(parents=True, exist_ok=True)
        self.shm.mkdir(mode=0o700, parents=True, exist_ok=True)
        await asyncio.to_thread(tplcache.register_user, self.config.cache_dir, self.config.data_dir)
        await self.sweep_templates()
        self._started = True

    async def sweep_templates(self) -> None:
        """Remove memory-template generations no VM can start from and no disk chain uses (see tplcache)."""
        try:
            gone = await asyncio.to_thread(tplcache.sweep, self.config.cache_dir, self.template_shm)
        except OSError:
            log.exception("sweeping old memory templates in %s failed", self.config.cache_dir)
            return
        for d in gone:
            log.info("removed the old memory template %s/%s", d.parent.name, d.name)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()
        for q in self._qmp.values():
            await q.aclose()
        self._qmp.clear()
        with contextlib.suppress(OSError):
            self.shm.rmdir()  # only when empty: running VMs keep theirs
        self.jail.close()

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def guest(self) -> tuple[image.GuestImages, accel_mod.Accel]:
        async with self._lock("guest"):
            if self._guest is None or self._accel is None:
                self._channel = self.agent_channel()
                g = await asyncio.to_thread(image.ensure_guest, self.config.cache_dir, vsock=self._channel == "vsock")
                self._runtime = await asyncio.to_thread(runtime.ensure_runtime, self.config.cache_dir)
                self._accel = await accel_mod.choose(self.config.cache_dir, g)
                if self._accel.name == "tcg":
                    self._aslr = accel_mod.keeps_aslr(self.config.tcg_aslr, await asyncio.to_thread(qemu.version))
                self._guest = g
            return self._guest, self._accel

    def agent_channel(self) -> str:
        """``vsock`` when the host has vhost-vsock (or it is asked for and there), else ``serial``."""
        want = self.config.agent_channel
        if want == "serial":
            return "serial"
        why = vsock.probe()
        if why is None:
            return "vsock"
        if want == "vsock":
            raise BackendError(f"the agent channel vsock was asked for (BRANCHBOX_VM_AGENT=vsock), but {why}")
        log.info("microVM agents use virtio-serial: no vhost-vsock on this host (%s)", why)
        return "serial"

    async def machine(self, vcpus: int, memory_mb: int) -> qemu.Machine:
        g, acc = await self.guest()
        extra = "bb.rt" + (f" bb.vsock={vsock.AGENT_PORT}" if self._channel == "vsock" else "")
        return qemu.Machine(vcpus=vcpus, memory_mb=memory_mb, accel=acc.name, kernel=g.kernel, initrd=g.initrd,
                            cmdline=accel_mod.guest_cmdline(acc.name, extra, tcg_aslr=self._aslr),
                            agent=self._channel, runtime=self._runtime)  # fmt: skip

    def spawn_vm(self, vmid: str, m: qemu.Machine, *, incoming: bool, nice: int = 0) -> int:
        """Start QEMU for ``vmid`` (its dir and disk are ready)."""
        return self.run_vm(self.launch_vm(vmid, m, nice=nice), incoming=incoming)

    def launch_vm(self, vmid: str, m: qemu.Machine, *, nice: int = 0) -> Launch:
        """Start the jail's launcher for ``vmid`` (see jail.py); a vsock machine gets a guest CID of its own."""
        p = self.paths(vmid)
        p.dir.mkdir(parents=True, exist_ok=True)
        if m.agent != "vsock":
            return self.jail.start(vmid, m, p, nice=nice)
        fd, cid = vsock.claim_cid()
        try:
            (p.dir / "vsock_cid").write_text(f"{cid}\n")
        except BaseException:
            os.close(fd)
            raise
        return self.jail.start(vmid, m, p, nice=nice, vsock_fd=fd, vsock_cid=cid)  # QEMU holds the CID

    def run_vm(self, launch: Launch, *, incoming: bool) -> int:
        """QEMU's command line to the launcher, once the VM's disk and RAM exist; returns QEMU's pid."""
        argv = qemu.command(launch.machine, launch.paths, incoming=incoming, vsock_cid=launch.vsock_cid)
        return self.jail.go(launch, argv)

    def paths(self, vmid: str) -> qemu.VmPaths:
        return qemu.VmPaths(dir=self.run_root / vmid, ram=self.shm / f"{vmid}.ram")

    # ------------------------------------------------------------------ boot
    async def boot(self, spec: BootSpec, timer: PhaseTimer) -> SandboxHandle:
        sid = spec.sandbox_id
        try:
            with timer.phase("vm_images"):
                vcpus = max(1, math.ceil(spec.resources.cpu))
                m = await self.machine(vcpus, spec.resources.memory_mb)
            if spec.memory_snapshot is not None:
                saved = self.load_saved(spec.memory_snapshot)
                return await self.restore(sid, saved, timer, nice=10 if spec.background else 0)
            tree = spec.layers[-1]
            digest = tree.parent.name
            with timer.phase("vm_rootfs"):
                base = await asyncio.to_thread(image.ensure_rootfs, self.config.cache_dir, digest, tree, spec.idmap)
            if self.config.templated:
                with timer.phase("vm_template"):
                    tpl = await self.memory_template(digest, base, m)
                handle = await self.restore(sid, tpl, timer, nice=10 if spec.background else 0, pool=True)
                if spec.background and m.accel == "tcg":  # a warm pool member: nobody waits for it
                    try:
                        with timer.phase("vm_warm_up"):
                            await self.warm_up(handle)
                    except BaseException:
                        await self.destroy(sid, handle)  # the VM may be a pool slot's (its dir is not sid's)
                        raise
                return handle
            handle = await self.cold_boot(sid, base, m, timer, hostname=spec.hostname)
            with timer.phase("vm_boot"):  # a boot takes seconds under TCG: wait here, with the boot timeout
                await (await self._wait_agent(handle)).aclose()
            return handle
        except BaseException:
            await self.destroy(sid, None)
            raise

    async def cold_boot(
        self, vmid: str, base: Path, m: qemu.Machine, timer: PhaseTimer, *, hostname: str = "branchbox"
    ) -> SandboxHandle:
        p = self.paths(vmid)
        p.dir.mkdir(parents=True, exist_ok=True)
        (p.dir / "owner").write_text(vmid)
        with timer.phase("vm_disk"):
            await asyncio.to_thread(image.create_overlay, base, p.disk)
        m = dataclasses.replace(m, cmdline=f"{m.cmdline} bb.hostname={hostname}")
        with timer.phase("vm_spawn"):
            pid = self.spawn_vm(vmid, m, incoming=False)
        return self._handle(vmid, vmid, pid, m)

    def _handle(self, sid: str, vmid: str, pid: int, m: qemu.Machine) -> SandboxHandle:
        started = qemu.start_time(pid)
        if started is None:
            raise BackendError(f"QEMU exited at once: see {self.paths(vmid).log}")
        p = self.paths(vmid)
        (p.dir / "pid").write_text(f"{pid} {started}\n")
        (p.dir / "machine.json").write_text(json.dumps(_machine_json(m)))
        extra = {"vm_dir": str(p.dir), "ram": str(p.ram), "accel": m.accel}
        if m.agent == "vsock":
            cid = vsock.read_cid(p.dir / "vsock_cid")
            if cid is None:
                raise BackendError(f"the vsock VM {vmid} has no guest CID recorded in {p.dir}")
            extra["agent_vsock"] = str(VsockAddress(cid, vsock.AGENT_PORT))
        return SandboxHandle(sandbox_id=sid, pid=pid, pid_start_time=started, agent_socket=p.agent, extra=extra)

    def load_saved(self, d: Path) -> Saved:
        meta = json.loads((d / "machine.json").read_text())
        return Saved(dir=d, ram=d / "ram", machine=_machine_from(meta))

    async def restore(
        self, sid: str, saved: Saved, timer: PhaseTimer, *, nice: int = 0, pool: bool = False
    ) -> SandboxHandle:
        """A new VM continuing from ``saved``: from a pool slot when one waits, else a fresh QEMU."""
        slot: Slot | None = None
        if pool and self.config.pool_size > 0:
            ip = self._pools.get(str(saved.dir))
            if ip is None:
                ip = self._pools[str(saved.dir)] = IncomingPool(self, saved, self.config.pool_size)
            slot = ip.take()
            ip.refill()
        if slot is None:
            vmid = sid
            with timer.phase("vm_spawn"):  # the launcher's interpreter starts while the RAM and disk are made
                launch = self.launch_vm(vmid, saved.machine, nice=nice)
            try:
                with timer.phase("vm_prepare"):
                    await self.prepare(vmid, saved)
                with timer.phase("vm_spawn"):
                    pid = self.run_vm(launch, incoming=True)
            except BaseException:
                self.jail.abort(launch)
                raise
            with timer.phase("vm_qmp"):
                q = await QMP.connect(self.paths(vmid).qmp)
        else:
            vmid, pid, q = slot.vmid, slot.pid, slot.qmp
            if nice == 0:
                qemu.set_nice(pid, 0)
                self.jail.foreground(vmid)
        try:
            (self.paths(vmid).dir / "owner").write_text(sid)
            self._qmp[sid] = q
            handle = self._handle(sid, vmid, pid, saved.machine)
            with timer.phase("vm_incoming"):
                await self.incoming(q, saved)
        except BaseException:
            if vmid != sid:  # a pool slot: boot()'s cleanup only knows the sandbox id
                await self.remove_vm(self.paths(vmid).dir)
            raise
        return handle

    async def prepare(self, vmid: str, saved: Saved) -> None:
        """RAM copy and disk overlay for a VM that will restore ``saved``."""
        p = self.paths(vmid)
        p.dir.mkdir(parents=True, exist_ok=True)
        (p.dir / "owner").write_text(vmid)

        def work() -> None:
            memfile.sparse_copy(saved.ram, p.ram)
            image.create_overlay(saved.disk, p.disk, base_format="qcow2")

        await asyncio.to_thread(work)

    async def incoming(self, q: QMP, saved: Saved) -> None:
        await q.execute("migrate-set-capabilities", {"capabilities": _CAPS})
        fd = os.open(saved.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await q.execute("getfd", {"fdname": "state"}, fd=fd)
        finally:
            os.close(fd)
        await q.execute("migrate-incoming", {"uri": "fd:state"})
        await self._migration_done(q, "restoring")
        await q.execute("cont")  # saved stopped, so QEMU does not start it by itself

    async def _migration_done(self, q: QMP, what: str) -> None:
        ev = await q.wait_event(
            lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in ("completed", "failed", "cancelled"),
            timeout=MIGRATION_TIMEOUT,
        )
        if ev["data"]["status"] != "completed":
            raise BackendError(f"{what} the VM failed: migration {ev['data']['status']}")

    # ------------------------------------------------------------------ memory templates
    async def memory_template(self, digest: str, base: Path, m: qemu.Machine) -> Saved:
        """The saved template VM for (template, machine): booted once, then reused by every create."""
        key = f"{digest[:16]}-{m.key()}"
        current = self.config.cache_dir / "memtemplates" / key / "current"

        def lookup() -> Saved | None:
            with contextlib.suppress(OSError):
                gen = os.readlink(current)
                saved = Saved(dir=current.parent / gen, ram=self.template_shm / f"{key}-{gen}.ram", machine=m)
                if saved.ram.exists() and saved.state.exists() and saved.disk.exists():
                    return saved
            return None

        found = lookup()
        if found is not None:
            return found
        async with self._lock(f"tpl-{key}"):
            found = lookup()
            if found is not None:
                return found
            # a new generation: VMs still running on an older one keep their disk's backing file
            gen = secrets.token_hex(4)
            saved = Saved(dir=current.parent / gen, ram=self.template_shm / f"{key}-{gen}.ram", machine=m)
            await self._build_template(base, m, saved)
            tmp_link = current.with_name(f".current.{gen}")
            tmp_link.symlink_to(gen)
            tmp_link.rename(current)
            for stale in memfile.remove_stale_templates(self.template_shm, key):
                log.info("removed the memory template %s (built for another guest image)", stale.name)
            await self.sweep_templates()  # their disks too, once no VM or snapshot uses them
        return saved

    async def _build_template(self, base: Path, m: qemu.Machine, saved: Saved) -> None:
        vmid = f"tpl-{secrets.token_hex(6)}"
        p = self.paths(vmid)
        key = saved.dir.parent.name
        self.template_shm.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.info("booting template VM %s for %s", vmid, key)
        handle = await self.cold_boot(vmid, base, m, PhaseTimer())
        try:
            agent = await self._wait_agent(handle)
            try:
                await agent.exec(["true"], timeout=60)  # pages in the exec path once, for every clone
            finally:
                await agent.aclose()
            tmp = saved.dir.with_name(f".{saved.dir.name}.{vmid}")
            tmp.mkdir(parents=True, exist_ok=True)
            q = await self.qmp(handle)
            await q.execute("stop")
            await self.save_state(q, tmp / "state")
            await qemu.kill(handle.pid, handle.pid_start_time)
            # a copy when the data dir and the cache are on different filesystems (a rename cannot cross them); the
            # overlay holds only what the template's boot wrote, and names its base by absolute path
            await asyncio.to_thread(shutil.move, p.disk, tmp / "disk.qcow2")
            (tmp / "machine.json").write_text(json.dumps(_machine_json(m)))
            os.rename(p.ram, saved.ram)
            for f in (tmp / "disk.qcow2", saved.ram):  # the template VM's uid goes back to the pool of free ids
                os.chown(f, os.geteuid(), os.getegid())
            tmp.rename(saved.dir)
        finally:
            await self.destroy(vmid, handle)

    async def warm_up(self, handle: SandboxHandle) -> None:
        """Run the agent's exec path a few times in a restored VM before anyone uses it.

        Under TCG a restored VM is a new QEMU process whose translation cache is empty: the first commands are
        translated (and their translated blocks chained) as they run. Measured on a warm pool member: the first
        user command took ~25 ms after the Manager's one warm-up command, ~17 ms after WARM_UP_EXECS more (the
        same as every later one). Nothing of it survives in the guest's memory, so the template VM cannot do it
        once for every clone."""
        agent = await AgentClient.connect(handle.agent_address, timeout=self.config.boot_timeout, open_session=True)
        try:
            for _ in range(WARM_UP_EXECS):
                await agent.exec(["true"], timeout=60)
        finally:
            await agent.aclose()

    async def _wait_agent(self, handle: SandboxHandle) -> AgentClient:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.boot_timeout
        while True:
            try:
                return await AgentClient.connect(handle.agent_address, timeout=max(0.1, deadline - loop.time()),
                                                 open_session=True)  # fmt: skip
            except BranchboxError:
                if not self.is_alive(handle):
                    raise BackendError(f"the VM died while booting: {self._tail(handle)}") from None
                if loop.time() >= deadline:
                    raise
                if "agent_vsock" in handle.extra:
                    # a vsock connect fails at once (reset) until the guest agent listens: nothing to wait on
                    await asyncio.sleep(VSOCK_RETRY_S)

    def _tail(self, handle: SandboxHandle) -> str:
        d = Path(handle.extra.get("vm_dir", ""))
        out = []
        for name in ("console.log", "qemu.log"):
            with contextlib.suppress(OSError):
                out.append((d / name).read_text(errors="replace")[-500:])
        return " | ".join(x.strip() for x in out if x.strip()) or "no output"

    async def save_state(self, q: QMP, dest: Path) -> None:
        """Device state of a stopped VM (RAM excluded: it is a shared file) into ``dest``."""
        await q.execute("migrate-set-capabilities", {"capabilities": _CAPS})
        q.drop_events()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await q.execute("getfd", {"fdname": "save"}, fd=fd)
        finally:
            os.close(fd)
        await q.execute("migrate", {"uri": "fd:save"})
        await self._migration_done(q, "saving")

    # ------------------------------------------------------------------ memory snapshots
    async def capture(self, handle: SandboxHandle, dest: Path) -> LayerInfo:
        """Save a *stopped* VM (the Manager paused it) into the layer dir ``dest``: state, RAM, disk. Durable."""
        q = await self.qmp(handle)
        p = qemu.VmPaths(dir=Path(handle.extra["vm_dir"]), ram=Path(handle.extra["ram"]))
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        await self.save_state(q, dest / "state")

        def copy() -> int:
            machine = json.loads((p.dir / "machine.json").read_text())
            n = memfile.sparse_copy(p.ram, dest / "ram")
            shutil.copyfile(p.disk, dest / "disk.qcow2")
            (dest / "machine.json").write_text(json.dumps(machine))
            for name in ("state", "ram", "disk.qcow2", "machine.json"):
                fd = os.open(dest / name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return n + os.stat(dest / "disk.qcow2").st_size + os.stat(dest / "state").st_size

        size = await asyncio.to_thread(copy)
        return LayerInfo(path=dest, size_bytes=size, files=4)

    # ------------------------------------------------------------------ lifecycle of one VM
    async def qmp(self, handle: SandboxHandle) -> QMP:
        q = self._qmp.get(handle.sandbox_id)
        if q is None or q.closed:
            q = await QMP.connect(Path(handle.extra["vm_dir"]) / "qmp.sock")
            self._qmp[handle.sandbox_id] = q
        return q

    def is_alive(self, handle: SandboxHandle) -> bool:
        return qemu.alive(handle.pid, handle.pid_start_time)

    async def wait_exit(self, handle: SandboxHandle) -> None:
        await qemu.wait_exit(handle.pid, handle.pid_start_time)

    def foreground(self, handle: SandboxHandle) -> None:
        qemu.set_nice(handle.pid, 0)
        self.jail.foreground(Path(handle.extra["vm_dir"]).name)

    def set_hostname(self, handle: SandboxHandle, hostname: str) -> None:
        raise NotSupportedError("a microVM's hostname is set through its agent (identity), not by the backend")

    async def pause(self, handle: SandboxHandle) -> None:
        await (await self.qmp(handle)).execute("stop")

    async def resume(self, handle: SandboxHandle) -> None:
        await (await self.qmp(handle)).execute("cont")

    async def destroy(self, sandbox_id: str, handle: SandboxHandle | None) -> None:
        q = self._qmp.pop(sandbox_id, None)
        if q is not None:
            await q.aclose()
        dirs = {self.run_root / sandbox_id}
        if handle is not None and "vm_dir" in handle.extra:
            dirs.add(Path(handle.extra["vm_dir"]))
        for d in dirs:
            await self.remove_vm(d)

    async def remove_vm(self, d: Path) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid, started = map(int, (d / "pid").read_text().split())
            await qemu.kill(pid, started)
        await self.jail.release(d.name)
        memfile.remove(self.shm / f"{d.name}.ram")
        await asyncio.to_thread(shutil.rmtree, d, True)

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        removed = []
        for d in list(self.run_root.iterdir()) if self.run_root.is_dir() else []:
            try:
                owner = (d / "owner").read_text().strip()
            except OSError:
                owner = d.name
            if owner not in keep:
                await self.remove_vm(d)
                removed.append(owner)
        vms = {d.name for d in self.run_root.iterdir()} if self.run_root.is_dir() else set()
        for vmid in self.jail.vm_ids() - vms:  # a VM whose run dir went first (a crash in between)
            await self.jail.release(vmid)
        keep_ram = {f"{name}.ram" for name in vms}
        for f in self.shm.glob("*.ram") if self.shm.is_dir() else []:
            if f.name not in keep_ram:
                memfile.remove(f)
        return removed
