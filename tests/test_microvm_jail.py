"""QEMU's jail (backends/microvm/jail.py): its own uid, seccomp, a cgroup with limits, a private mount namespace.

The first test inspects real QEMU processes of real VMs from the host (/proc); the others run a shell in the same
jail instead of QEMU (the launcher execs whatever argv it is given), so an attacker's moves inside it can be tried
and their outcome read back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from branchbox.backends.container import cgroups as cg_mod
from branchbox.backends.microvm import jail as jail_mod
from branchbox.backends.microvm import qemu
from branchbox.backends.microvm.jail import Jail, JailConfig
from branchbox.core.manager import Manager
from tests.conftest import make_settings, new_data_dir

pytestmark = [pytest.mark.microvm, pytest.mark.root]

if not shutil.which("qemu-system-x86_64"):
    pytest.skip("qemu-system-x86_64 is not installed (make apt installs qemu-system-x86)", allow_module_level=True)

from tests.test_microvm import _vm_env, leftovers, vm_data_dir  # noqa: E402, F401 - shared fixtures


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _mount_points(pid: int) -> list[str]:
    return [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]


def _limit(cg: cg_mod.Cgroups, vmid: str, controller: str, v1: str, v2: str) -> int:
    dirs = cg.dirs(vmid)
    f = dirs["unified"] / v2 if cg.version == 2 else dirs[controller] / v1
    return int(f.read_text())


def _background(pid: int, vmid: str, cg: cg_mod.Cgroups) -> bool:
    """Made ahead of demand: every QEMU thread at nice 10, and (where the VM has a cpu cgroup: v2) an idle cgroup."""
    nices = {int(Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[16])
             for t in os.listdir(f"/proc/{pid}/task")}  # fmt: skip
    idle = cg.is_idle(vmid) if cg.cpu_dir(vmid) is not None else None
    assert idle in (None, nices == {10}), (nices, idle)
    return nices == {10}


@pytest.fixture
async def vmm(default_template: Any, vm_data_dir: Path) -> AsyncIterator[Manager]:  # noqa: F811
    async with Manager.open(make_settings(vm_data_dir, default_backend="microvm")) as m:
        yield m
    assert leftovers(vm_data_dir) == []


async def test_qemu_runs_unprivileged_in_its_own_cgroup_and_mount_namespace(
    vmm: Manager,
    vm_data_dir: Path,  # noqa: F811 - the fixture
) -> None:
    be = vmm._backends["microvm"]
    infos = [await vmm.create(backend="microvm", memory_mb=256)]
    for pool in be._pools.values():
        await pool.wait_ready()
    slots = {slot.vmid: slot.pid for pool in be._pools.values() for slot in pool.ready}
    assert slots and all(_background(pid, vmid, be.jail.cgroups()) for vmid, pid in slots.items())
    infos.append(await vmm.create(backend="microvm", memory_mb=256))
    claimed = Path(vmm._live[infos[1].id].handle.extra["vm_dir"]).name
    assert claimed in slots and not _background(slots[claimed], claimed, be.jail.cgroups())  # claimed: foreground
    vms = []
    for info in infos:
        handle = vmm._live[info.id].handle
        vms.append((info, handle.pid, Path(handle.extra["vm_dir"]).name, Path(handle.extra["vm_dir"])))
    cfg = be.config.jail
    uids = set()
    for info, pid, vmid, vm_dir in vms:
        assert (await vmm.exec(info.id, ["echo", "ok"])).stdout == b"ok\n"  # the VM works in its jail
        st = _status(pid)
        assert "qemu-system" in Path(f"/proc/{pid}/cmdline").read_text()
        uid = {int(x) for x in st["Uid"].split()}
        assert len(uid) == 1 and cfg.uid_base <= min(uid) < cfg.uid_base + cfg.uid_count, st["Uid"]
        assert {int(x) for x in st["Gid"].split()} == uid and st["Groups"] == ""
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"  # QEMU's -sandbox filter (mode 2)
        uids |= uid

        cg = be.jail.cgroups()
        for d in cg.dirs(vmid).values():
            assert str(pid) in (d / "cgroup.procs").read_text().split()
        limit_mb = 256 + qemu.TCG_TB_MB + jail_mod.OVERHEAD_MB
        assert _limit(cg, vmid, "memory", "memory.limit_in_bytes", "memory.max") == limit_mb << 20
        assert _limit(cg, vmid, "pids", "pids.max", "pids.max") == jail_mod.PIDS_BASE + 1

        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
        mounts = _mount_points(pid)
        own = {str(vm_dir / "disk.qcow2"), str(vm_dir / "console.log"), handle_ram(vmm, info.id)}
        data = [m for m in mounts if m.startswith(str(vm_data_dir))]
        assert set(data) <= own, data  # its backing chain is in the cache (memory template, guest image)
        assert own <= set(mounts)
        for _, _, other, _ in vms:
            if other != vmid:
                assert not any(other in m for m in mounts)  # no file of the other VM
        assert "/proc" not in mounts and "/sys" not in mounts
        root = f"/proc/{pid}/root"
        assert sorted(os.listdir(f"{root}{vm_dir}")) == ["console.log", "disk.qcow2"]
        assert sorted(os.listdir(f"{root}{vm_data_dir}")) == ["vm"]  # no state.db, no sandboxes, no layers
    assert len(uids) == 2  # one uid per VM

    gone = [(vmid, int(next(iter(_status(pid)["Uid"].split())))) for _, pid, vmid, _ in vms]
    for info in infos:
        await vmm.destroy(info.id)
    for vmid, uid in gone:
        assert not be.jail.cgroups().exists(vmid)
        fd = os.open(cfg.lock_dir / str(uid), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the uid is free again: its QEMU is gone
        finally:
            os.close(fd)


def handle_ram(m: Manager, sid: str) -> str:
    return str(m._live[sid].handle.extra["ram"])


# ---------------------------------------------------------------- a shell in QEMU's place
@pytest.fixture
def jail_env() -> Iterator[tuple[Jail, Path]]:
    d = new_data_dir()
    jail = Jail(JailConfig(cgroup_parent=f"bbtest-{d.name}-vm"))
    try:
        yield jail, d
    finally:
        cg = jail.cgroups()
        for vmid in cg.list_ids():
            with contextlib.suppress(OSError):
                cg.kill(vmid)
        jail.close()
        shutil.rmtree(d, ignore_errors=True)


def _fake_vm(d: Path, vmid: str) -> tuple[qemu.Machine, qemu.VmPaths]:
    (d / "state.db").write_text("secrets")
    (d / "vm" / "run" / vmid).mkdir(parents=True)
    (d / "kernel").mkdir(exist_ok=True)
    for name in ("vmlinux", "initrd.cpio"):
        (d / "kernel" / name).write_text(name)
    paths = qemu.VmPaths(dir=d / "vm" / "run" / vmid, ram=d / f"{vmid}.ram")
    paths.disk.write_text("disk")
    m = qemu.Machine(vcpus=1, memory_mb=64, accel="tcg", kernel=d / "kernel" / "vmlinux",
                     initrd=d / "kernel" / "initrd.cpio", cmdline="")  # fmt: skip
    return m, paths


async def _run_jailed(jail: Jail, d: Path, vmid: str, script: str) -> str:
    m, paths = _fake_vm(d, vmid)
    pid = jail.spawn(vmid, ["/bin/sh", "-c", script], m, paths)
    _, status = os.waitpid(pid, 0)
    out = paths.log.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, out
    await jail.release(vmid)
    assert not jail.cgroups().exists(vmid)
    return out


async def test_the_jail_shows_only_the_vms_files_and_refuses_an_escape(jail_env: tuple[Jail, Path]) -> None:
    jail, d = jail_env
    vm_dir = d / "vm" / "run" / "vm-a"
    script = f"""
        set -u
        echo "ids $(id -u) $(id -g) [$(id -G)]"
        echo "tree $(find / -path /usr -prune -o -print | sort | tr '\\n' ' ')"
        cat {d}/state.db 2>/dev/null && echo "read state.db"
        echo x > /planted 2>/dev/null && echo "wrote into /"
        echo x > /usr/planted 2>/dev/null && echo "wrote into /usr"
        echo x >> {vm_dir}/disk.qcow2 && echo "wrote its disk"
        echo x >> {d}/kernel/vmlinux 2>/dev/null && echo "wrote the kernel"
        mount -t tmpfs none /dev 2>/dev/null && echo "mounted"
        ls /proc/1 >/dev/null 2>&1 && echo "saw processes"
        exit 0
    """
    out = await _run_jailed(jail, d, "vm-a", script)
    lines = out.splitlines()
    ids = next(x for x in lines if x.startswith("ids ")).split()
    assert ids[1] == ids[2] and int(ids[1]) >= jail.config.uid_base and ids[3] == f"[{ids[1]}]", ids
    tree = set(next(x for x in lines if x.startswith("tree ")).split()[1:])
    own = {str(vm_dir / "disk.qcow2"), str(vm_dir / "console.log"), str(d / "vm-a.ram"),
           str(d / "kernel" / "vmlinux"), str(d / "kernel" / "initrd.cpio")}  # fmt: skip
    dirs = {str(p) for f in own for p in Path(f).parents}
    system = {"/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/etc/ld.so.cache",
              "/dev", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}  # fmt: skip
    assert own <= tree and tree <= own | dirs | system, tree - own - dirs - system
    assert str(vm_dir / "jail") not in tree and str(d / "state.db") not in tree
    assert "wrote its disk" in lines
    for bad in ("read state.db", "wrote into /", "wrote into /usr", "wrote the kernel", "mounted", "saw processes"):
        assert bad not in lines, out
    assert (d / "state.db").read_text() == "secrets" and (d / "kernel" / "vmlinux").read_text() == "vmlinux"


async def test_two_jails_never_share_a_uid_and_each_holds_it_while_it_runs(jail_env: tuple[Jail, Path]) -> None:
    jail, d = jail_env
    held = [jail.claim_id() for _ in range(3)]
    try:
        assert len({uid for uid, _ in held}) == 3
        other = Jail(JailConfig(uid_base=held[0][0], uid_count=1, cgroup_parent=jail.config.cgroup_parent))
        with pytest.raises(OSError, match="all 1 VM uids"):
            other.claim_id()  # another daemon on the host sees the claim
    finally:
        for _, fd in held:
            os.close(fd)
    m, paths = _fake_vm(d, "vm-b")
    single = Jail(JailConfig(uid_base=held[0][0], uid_count=1, cgroup_parent=jail.config.cgroup_parent))
    pid = single.spawn("vm-b", ["/bin/sh", "-c", "read x"], m, paths)  # waits on its stdin (/dev/null): exits
    os.waitpid(pid, 0)
    await single.release("vm-b")
    uid, fd = single.claim_id()  # free again once the process is gone
    os.close(fd)
    assert uid == held[0][0]


async def test_a_launch_that_fails_says_which_step(jail_env: tuple[Jail, Path]) -> None:
    jail, d = jail_env
    m, paths = _fake_vm(d, "vm-c")
    pid = jail.spawn("vm-c", ["/usr/bin/no-such-qemu"], m, paths)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 127
    assert "branchbox jailer: exec: [Errno 2]" in paths.log.read_text()
    await jail.release("vm-c")


async def test_a_launch_given_up_before_its_files_exist_leaves_nothing(jail_env: tuple[Jail, Path]) -> None:
    jail, d = jail_env
    m, paths = _fake_vm(d, "vm-d")
    launch = jail.start("vm-d", m, paths)  # a restore starts the launcher, then copies RAM and disk...
    assert launch.pid is not None and jail.cgroups().exists("vm-d")
    jail.abort(launch)  # ...which failed
    assert qemu.start_time(launch.pid) is None and not jail.cgroups().exists("vm-d")
    single = Jail(JailConfig(uid_base=launch.uid, uid_count=1, cgroup_parent=jail.config.cgroup_parent))
    uid, fd = single.claim_id()  # its uid is free again
    os.close(fd)
    assert uid == launch.uid
