"""The microVM backend with real QEMU (TCG on hosts whose KVM cannot run standard guests).

One guest image cache (kernel, initrd, ext4 image, memory template) is shared by the session, so only the first
test pays for building and for booting the template VM; every other VM is a templated start (a restore). Each test
checks that nothing it made is left: QEMU processes, sockets, run dirs, RAM files on tmpfs, layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from branchbox.core.manager import Manager
from branchbox.core.pool import PoolConfig
from branchbox.errors import InvalidStateError, NotFoundError
from branchbox.models import SandboxInfo, SandboxState
from tests.conftest import make_settings, new_data_dir, vm_cache

pytestmark = [pytest.mark.microvm, pytest.mark.root]

if not shutil.which("qemu-system-x86_64"):
    pytest.skip("qemu-system-x86_64 is not installed (make apt installs qemu-system-x86)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _vm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHBOX_VM_CACHE", str(vm_cache()))


def qemu_pids(data_dir: Path) -> list[int]:
    """QEMU processes whose command line points into ``data_dir`` (this test's VMs)."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            if b"qemu-system" in cmd and str(data_dir).encode() in cmd:
                found.append(int(p))
    return found


def leftovers(data_dir: Path) -> list[str]:
    from branchbox.backends.microvm.memfile import shm_root

    out = [f"qemu pid {p}" for p in qemu_pids(data_dir)]
    run = data_dir / "vm" / "run"
    if run.is_dir():
        out += [f"run dir {d.name}" for d in run.iterdir()]
    shm = shm_root(data_dir)
    if shm.is_dir():
        out += [f"tmpfs {f.name}" for f in shm.iterdir()]
    layers = data_dir / "layers"
    if layers.is_dir():
        out += [f"layer {d.name}" for d in layers.iterdir()]
    from branchbox.backends.container.cgroups import detect

    vm_cgroups = detect(f"bbtest-{data_dir.name}-vm").parents.values()  # make_settings' cgroup_parent + "-vm"
    out += [f"cgroup {p}" for p in vm_cgroups if p.exists()]
    return out


def jailed(pid: int) -> bool:
    """QEMU runs as a uid of its own under its seccomp filter (see test_microvm_jail.py for the whole jail)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return "0" not in status["Uid"].split() and status["Seccomp"].strip() == "2"


@pytest.fixture
def vm_data_dir() -> Iterator[Path]:
    d = new_data_dir()
    try:
        yield d
    finally:
        for pid in qemu_pids(d):  # a failed test must not leave VMs running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        from branchbox.backends.microvm.memfile import shm_root

        shutil.rmtree(shm_root(d), ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def vmm(default_template: Any, vm_data_dir: Path) -> AsyncIterator[Manager]:
    async with Manager.open(make_settings(vm_data_dir, default_backend="microvm")) as m:
        yield m
    await asyncio.sleep(0)
    assert leftovers(vm_data_dir) == []


async def _counter(m: Manager, sid: str) -> int:
    """Start a process that counts in its own memory and publishes the count to /tmp/count."""
    await m.spawn(sid, "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
                       "sleep 0.05; done", tag="counter")  # fmt: skip
    return await _count(m, sid, above=0)


async def _count(m: Manager, sid: str, *, above: int) -> int:
    for _ in range(600):
        r = await m.exec(sid, ["cat", "/tmp/count"])
        if r.exit_code == 0 and r.stdout.strip() and int(r.stdout) > above:
            return int(r.stdout)
        await asyncio.sleep(0.05)
    raise AssertionError(f"the counter in {sid} did not pass {above}")


async def test_boot_exec_files_pause_resume(vmm: Manager) -> None:
    info = await vmm.create(template="default", backend="microvm", memory_mb=256, env={"GREETING": "hi"})
    assert info.backend == "microvm" and info.state is SandboxState.RUNNING
    r = await vmm.exec(info.id, "uname -r; hostname; echo $GREETING; cat /proc/1/cmdline | tr '\\0' ' '")
    kernel, host, greeting, init = r.stdout.decode().splitlines()
    assert kernel.endswith("cloud-amd64") and kernel != os.uname().release  # its own kernel
    assert host == info.hostname and greeting == "hi"
    assert "bbagent" in init
    await vmm.write_file(info.id, "/root/note.txt", b"\x00binary\xff")
    assert await vmm.read_file(info.id, "/root/note.txt") == b"\x00binary\xff"
    assert "note.txt" in [e.name for e in await vmm.list_files(info.id, "/root")]
    tar = b"".join([c async for c in vmm.download_archive(info.id, "/root")])  # the guest's agent packs it
    made = await vmm.upload_archive(info.id, "/root/copy", _one(tar))
    assert made.files >= 1 and await vmm.read_file(info.id, "/root/copy/note.txt") == b"\x00binary\xff"
    be = vmm._backends["microvm"]
    for pool in be._pools.values():  # the QEMU waiting in -incoming defer for this memory template
        await pool.wait_ready()
    other = await vmm.create(template="default", backend="microvm", memory_mb=256)
    assert "vm_spawn" not in other.timings and "vm_incoming" in other.timings  # taken from the pool
    ids = [(await vmm.exec(s, ["cat", "/etc/machine-id"])).stdout for s in (info.id, other.id)]
    assert ids[0] != ids[1]  # clones of one memory template are made unique

    await vmm.pause(info.id)
    with pytest.raises(InvalidStateError):
        await vmm.exec(info.id, ["true"])
    t0 = await vmm.exec(other.id, ["cat", "/proc/uptime"])  # the other VM keeps running
    await vmm.resume(info.id)
    assert (await vmm.exec(info.id, ["echo", "back"])).stdout == b"back\n"
    assert t0.exit_code == 0
    await vmm.destroy(info.id)
    await vmm.destroy(other.id)
    assert await vmm.list() == []


async def test_snapshot_restore_and_fork_continue_processes(vmm: Manager) -> None:
    parent = await vmm.create(backend="microvm", memory_mb=256)
    await _counter(vmm, parent.id)
    await vmm.write_file(parent.id, "/root/state", b"parent")
    snap = await vmm.snapshot(parent.id, name="counting")
    at_snapshot = int((await vmm.exec(parent.id, ["cat", "/tmp/count"])).stdout)

    restored = await vmm.create(snapshot="counting", backend="microvm")
    assert restored.source == "snapshot"
    procs = [p for p in await vmm.list_processes(restored.id) if p.tag == "counter"]
    assert procs and procs[0].running  # the process itself, not a new one
    n = await _count(vmm, restored.id, above=0)
    assert n >= at_snapshot - 50  # continues from the snapshot's count, not from 0
    assert await vmm.read_file(restored.id, "/root/state") == b"parent"

    kids = await vmm.fork(parent.id, count=4)
    assert all(isinstance(k, SandboxInfo) for k in kids), kids
    children = [k for k in kids if isinstance(k, SandboxInfo)]
    base = int((await vmm.exec(parent.id, ["cat", "/tmp/count"])).stdout)
    for i, k in enumerate(children):
        await vmm.write_file(k.id, "/root/state", f"child{i}".encode())
    for i, k in enumerate(children):
        c = await _count(vmm, k.id, above=base - 100)
        await _count(vmm, k.id, above=c)  # still counting
        assert await vmm.read_file(k.id, "/root/state") == f"child{i}".encode()  # independent disks
        assert (await vmm.exec(k.id, ["hostname"])).stdout.decode().strip() == k.hostname
    assert await vmm.read_file(parent.id, "/root/state") == b"parent"
    hostnames = {k.hostname for k in children}
    assert len(hostnames) == 4

    for s in [parent.id, restored.id, *(k.id for k in children)]:
        await vmm.destroy(s)
    await vmm.delete_snapshot(snap.id)
    await vmm.wait_background()


async def test_ten_vms_at_once(vmm: Manager) -> None:
    infos = await asyncio.gather(*(vmm.create(backend="microvm", memory_mb=256) for _ in range(10)))
    outs = await asyncio.gather(*(vmm.exec(i.id, ["cat", "/etc/hostname", "/proc/sys/kernel/hostname"])
                                  for i in infos))  # fmt: skip
    assert all(o.exit_code == 0 for o in outs)
    assert [o.stdout.decode() for o in outs] == [f"{i.hostname}\n{i.hostname}\n" for i in infos]  # the agent wrote it
    await asyncio.gather(*(vmm.destroy(i.id) for i in infos))


@pytest.mark.slow
async def test_create_destroy_50_times_leaks_nothing(vmm: Manager, vm_data_dir: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        info = await vmm.create(backend="microvm", memory_mb=256)
        assert (await vmm.exec(info.id, ["true"])).exit_code == 0
        await vmm.destroy(info.id)
    pool = {d.name for d in (vm_data_dir / "vm" / "run").iterdir()}
    assert all(n.startswith("pool-") for n in pool)  # only the -incoming slot waiting for the next create
    assert len(os.listdir("/proc/self/fd")) <= fds + 4


async def test_cold_boot_without_template(default_template: Any, vm_data_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("BRANCHBOX_VM_TEMPLATED", "0")
    async with Manager.open(make_settings(vm_data_dir)) as m:
        info = await m.create(backend="microvm", memory_mb=192, hostname="cold-one")
        assert "vm_boot" in info.timings and "vm_incoming" not in info.timings
        r = await m.exec(info.id, "hostname; free -m | awk '/Mem:/{print $2}'")
        host, mem = r.stdout.decode().split()
        assert host == "cold-one" and 120 < int(mem) <= 192  # the memory limit is the VM's RAM
        await m.destroy(info.id)
    assert leftovers(vm_data_dir) == []


async def test_restart_reattaches_running_vms(default_template: Any, vm_data_dir: Path) -> None:
    settings = make_settings(vm_data_dir, keep_sandboxes_on_shutdown=True)
    async with Manager.open(settings) as m:
        info = await m.create(backend="microvm", memory_mb=256)
        await _counter(m, info.id)
        pid = (await m.list_processes(info.id))[0].pid
    assert qemu_pids(vm_data_dir)  # left running by the daemon
    async with Manager.open(settings) as m:
        got = await m.get(info.id)
        assert got.state is SandboxState.RUNNING
        assert pid in [p.pid for p in await m.list_processes(info.id)]
        n = await _count(m, info.id, above=0)
        await _count(m, info.id, above=n)
        await m.pause(info.id)  # QMP re-attached too
        await m.resume(info.id)
        await m.destroy(info.id)
    assert leftovers(vm_data_dir) == []


async def test_warm_pool_of_vms(default_template: Any, vm_data_dir: Path) -> None:
    pool = PoolConfig(template="default", min_size=1, target_free=1, max_size=2, memory_mb=256)
    async with Manager.open(make_settings(vm_data_dir, default_backend="microvm", pools=(pool,))) as m:
        await m.wait_pool_ready("default")
        info = await m.create(template="default", memory_mb=256, env={"K": "v"}, hostname="claimed")
        assert info.source == "warm"
        r = await m.exec(info.id, "echo $K; hostname; cat /etc/hostname; getent hosts claimed")
        assert r.stdout == b"v\nclaimed\nclaimed\n127.0.1.1       claimed\n"  # identity rewrote the files too
        await m.destroy(info.id)
        await m.remove_pool("default")
    assert leftovers(vm_data_dir) == []


async def test_memory_template_built_with_the_cache_on_another_filesystem(default_template: Any) -> None:
    """The data dir on a tmpfs, the cache elsewhere: the template VM's disk moves into the cache by copy (a rename
    failed with EXDEV, as in CI, where the cache is on the data dir's btrfs and tests' data dirs on /var/tmp).

    The cache is a new one sharing the guest image and rootfs of the shared cache, so a template is built."""
    shared = vm_cache()
    cache = shared.parent / f"vm-cache-{secrets.token_hex(4)}"
    cache.mkdir()
    for name in ("kernel", "initrd", "images", "accel.json"):
        if (shared / name).exists():
            (cache / name).symlink_to(shared / name)
    data = Path("/dev/shm") / f"bbtest-data-{secrets.token_hex(4)}"
    data.mkdir(mode=0o711)
    try:
        assert os.stat(data).st_dev != os.stat(cache).st_dev
        os.environ["BRANCHBOX_VM_CACHE"] = str(cache)  # the autouse fixture restores it
        async with Manager.open(make_settings(data, default_backend="microvm")) as m:
            info = await m.create(memory_mb=256)
            assert "vm_template" in info.timings
            assert (await m.exec(info.id, "cat /proc/cmdline")).exit_code == 0
            await m.destroy(info.id)
        built = list((cache / "memtemplates").glob("*/current/disk.qcow2"))
        assert len(built) == 1 and built[0].is_file()
        assert leftovers(data) == []
    finally:
        for pid in qemu_pids(data):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        from branchbox.backends.microvm.memfile import shm_root

        for d in (shm_root(data), shm_root(cache, "branchbox-templates"), data, cache):
            shutil.rmtree(d, ignore_errors=True)


async def test_pools_per_backend_beside_the_default(default_template: Any, vm_data_dir: Path) -> None:
    """A Manager whose default is containers keeps a microVM pool of the same template beside its container pool;
    each create is served by the pool of its backend."""
    vm = PoolConfig(template="default", backend="microvm", min_size=1, target_free=1, max_size=1, memory_mb=256)
    ct = PoolConfig(template="default", min_size=1, target_free=1, max_size=1, memory_mb=256)
    async with Manager.open(make_settings(vm_data_dir, pools=(vm, ct))) as m:
        await m.wait_pool_ready("default", backend="microvm")
        await m.wait_pool_ready("default")
        assert {(p.template, p.backend, p.ready) for p in m.pool_statistics()} == {
            ("default", "microvm", 1), ("default", "container", 1)
        }  # fmt: skip
        info = await m.create(template="default", backend="microvm", memory_mb=256, hostname="claimed")
        assert (info.source, info.backend) == ("warm", "microvm")
        r = await m.exec(info.id, "hostname; uname -r")
        assert r.stdout.decode().split()[0] == "claimed" and r.stdout.decode().split()[1].endswith("cloud-amd64")
        box = await m.create(template="default", memory_mb=256)
        assert (box.source, box.backend) == ("warm", "container")
        with pytest.raises(NotFoundError, match="on backend 'microvm'"):
            await m.remove_pool("other-template", backend="microvm")
        await m.destroy(info.id)
        await m.destroy(box.id)
        await m.remove_pool("default", backend="microvm")
        assert [p.backend for p in m.pool_statistics()] == ["container"]
        await m.remove_pool("default")
    assert leftovers(vm_data_dir) == []


def test_sdk_create_microvm_through_the_api(daemon_factory: Any) -> None:
    from branchbox.sdk import Sandbox

    d = daemon_factory(env={"BRANCHBOX_VM_CACHE": str(vm_cache())})
    with Sandbox.create(template="default", backend="microvm", base_url=d.url, request_timeout=300) as sbx:
        assert sbx.info.backend == "microvm"
        assert sbx.commands.run("uname -r").stdout.strip().endswith("cloud-amd64")
        assert qemu_pids(d.data_dir) and all(jailed(p) for p in qemu_pids(d.data_dir))  # the daemon's QEMUs too
        sbx.files.write("/root/a.txt", "A")
        assert sbx.files.read("/root/a.txt") == "A"
        sbx.pause()
        sbx.resume()
        kids = sbx.fork(count=1)
        assert len(kids) == 1 and not isinstance(kids[0], Exception)
        with kids[0] as kid:
            assert kid.files.read("/root/a.txt") == "A"
    d.destroy_all()
    d.stop()
    assert qemu_pids(d.data_dir) == []


async def test_agent_over_vsock(default_template: Any, vm_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts with vhost-vsock: the agent on a vsock port of a per-VM guest CID, the same protocol; restores and
    forks get CIDs of their own and keep serving."""
    from branchbox.agent.wire import VsockAddress
    from branchbox.backends.microvm import vsock

    why = vsock.probe()
    if why is not None:
        pytest.skip(f"no vhost-vsock on this host: {why}")
    monkeypatch.setenv("BRANCHBOX_VM_AGENT", "vsock")
    async with Manager.open(make_settings(vm_data_dir, default_backend="microvm")) as m:
        a, b = await asyncio.gather(*(m.create(backend="microvm", memory_mb=256) for _ in range(2)))
        addrs = [m._live[i.id].handle.agent_address for i in (a, b)]
        assert all(isinstance(x, VsockAddress) for x in addrs) and addrs[0] != addrs[1]
        for i in (a, b):
            argv = Path(f"/proc/{m._live[i.id].handle.pid}/cmdline").read_bytes().split(b"\0")
            assert any(x.startswith(b"vhost-vsock-device,guest-cid=") for x in argv)
            assert not any(b"virtserialport" in x for x in argv)
        r = await m.exec(a.id, "echo over-vsock; hostname")
        assert r.stdout.decode().split() == ["over-vsock", a.hostname]
        n = await _counter(m, a.id)
        kids = await m.fork(a.id, count=2)
        for k in kids:
            assert isinstance(k, SandboxInfo)
            assert m._live[k.id].handle.agent_address not in addrs
            await _count(m, k.id, above=n)
            await m.destroy(k.id)
        await m.destroy(a.id)
        await m.destroy(b.id)
    assert leftovers(vm_data_dir) == []


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
