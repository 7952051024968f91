"""The container backend against the real kernel: namespaces, overlay, cgroups, seccomp, capabilities.

Needs root; uses the default template (built once and cached by the session fixture ``default_template``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from branchbox.agentclient.client import AgentClient
from branchbox.backends.base import BootSpec, IdMap, SandboxHandle
from branchbox.backends.container import ContainerBackend
from branchbox.backends.container.zygote import MAX_SPARES, SPARE_PREFIX, SPARES
from branchbox.errors import BackendError
from branchbox.images.shift import shift_tree
from branchbox.images.store import TemplateStore
from branchbox.models import ExecResult, Resources, TemplateInfo
from branchbox.storage.overlay import prepare_sandbox_dirs, remove_sandbox_dirs
from branchbox.timing import PhaseTimer
from tests.conftest import templates_dir
from tests.leaks import _mounts

pytestmark = pytest.mark.root


def _mountinfo() -> frozenset[str]:
    """Host mount points where a leak of ours would show (see tests.leaks): the test root and pytest's tmp dirs."""
    return _mounts(tempfile.gettempdir())


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _eventually_async(
    get: Callable[[], Awaitable[dict[str, Any]]], pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> bool:
    deadline = time.monotonic() + timeout
    while not pred(await get()):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _eventually(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


class Sandbox:
    def __init__(self, backend: ContainerBackend, handle: SandboxHandle, spec: BootSpec, client: AgentClient):
        self.backend = backend
        self.handle = handle
        self.spec = spec
        self.client = client

    async def run(self, cmd: str | list[str], timeout: float | None = 30) -> ExecResult:
        return await self.client.exec(cmd, timeout=timeout)

    async def py(self, code: str) -> ExecResult:
        return await self.client.exec(["python3", "-c", code], timeout=30)


class Factory:
    """Boots sandboxes and always tears down what it made."""

    def __init__(self, backend: ContainerBackend, root: Path, rootfs: Path) -> None:
        self.backend = backend
        self.root = root
        self.rootfs = rootfs
        self.made: dict[str, tuple[Path, SandboxHandle | None, AgentClient | None]] = {}

    def spec(self, sandbox_id: str | None = None, *, layers: list[Path] | None = None, **res: int) -> BootSpec:
        sid = sandbox_id or f"t{uuid.uuid4().hex[:10]}"
        sdir = self.root / sid
        upper, work, run = prepare_sandbox_dirs(sdir, IdMap())
        self.made[sid] = (sdir, None, None)
        return BootSpec(
            sandbox_id=sid,
            layers=layers or [self.rootfs],
            upper_dir=upper,
            work_dir=work,
            run_dir=run,
            hostname=f"h-{sid}",
            resources=Resources(**res),  # type: ignore[arg-type]
            env={"BB_TEST": "1"},
        )

    def booted(self, sandbox_id: str, handle: SandboxHandle, client: AgentClient | None = None) -> None:
        """Record what a boot of a spec of this factory gave, for the teardown."""
        self.made[sandbox_id] = (self.made[sandbox_id][0], handle, client)

    async def boot(self, *, layers: list[Path] | None = None, **res: int) -> Sandbox:
        spec = self.spec(layers=layers, **res)
        handle = await self.backend.boot(spec, PhaseTimer())
        self.booted(spec.sandbox_id, handle)
        client = await AgentClient.connect(handle.agent_socket)
        self.booted(spec.sandbox_id, handle, client)
        return Sandbox(self.backend, handle, spec, client)

    async def destroy(self, sandbox_id: str) -> None:
        sdir, handle, client = self.made.pop(sandbox_id)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        await self.backend.destroy(sandbox_id, handle)
        remove_sandbox_dirs(sdir)

    async def close(self) -> None:
        for sid in list(self.made):
            await self.destroy(sid)


@pytest.fixture
def rootfs(default_template: TemplateInfo) -> Path:
    return TemplateStore(templates_dir()).rootfs(default_template.digest)


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[ContainerBackend]:
    b = ContainerBackend(tmp_path / "run", cgroup_parent=f"bbtest-{uuid.uuid4().hex[:8]}")
    await b.start()
    try:
        yield b
    finally:
        await b.cleanup_orphans(set())
        await b.aclose()
        assert b._cgroups is not None
        for p in b._cgroups.parents.values():
            with contextlib.suppress(OSError):
                p.rmdir()


@pytest.fixture
async def sandboxes(backend: ContainerBackend, tmp_path: Path, rootfs: Path) -> AsyncIterator[Factory]:
    f = Factory(backend, tmp_path / "sandboxes", rootfs)
    try:
        yield f
    finally:
        await f.close()


async def test_boot_exec_destroy_leaves_nothing(backend: ContainerBackend, sandboxes: Factory) -> None:
    mounts_before = _mountinfo()
    sbx = await sandboxes.boot()
    assert backend.is_alive(sbx.handle)
    r = await sbx.run(["sh", "-c", "echo hello; echo $BB_TEST; hostname"])
    assert r.exit_code == 0
    assert r.stdout_text.split() == ["hello", "1", sbx.spec.hostname]
    assert _mountinfo() == mounts_before  # every mount lives in the sandbox's own mount namespace
    cg_dirs = [Path(v) for k, v in sbx.handle.extra.items() if k.startswith("cgroup.")]
    assert cg_dirs
    assert all(d.is_dir() for d in cg_dirs)
    await sandboxes.destroy(sbx.spec.sandbox_id)
    assert not backend.is_alive(sbx.handle)
    assert not any(d.exists() for d in cg_dirs)
    assert not sbx.handle.agent_socket.exists()
    assert _mountinfo() == mounts_before


async def test_sees_only_its_own_processes(sandboxes: Factory) -> None:
    marker = f"{uuid.uuid4().int % 10**6}.5"
    host = subprocess.Popen(["sleep", marker])
    try:
        sbx = await sandboxes.boot()
        r = await sbx.run(["ps", "-eo", "pid,args"])
        assert r.exit_code == 0, r.stderr_text
        assert marker not in r.stdout_text
        pids = [int(line.split()[0]) for line in r.stdout_text.splitlines()[1:]]
        assert 1 in pids
        assert max(pids) < 100
        first = r.stdout_text.splitlines()[1]
        assert "branchbox-agent" in first  # the agent is PID 1
    finally:
        host.kill()
        host.wait()


async def test_filesystem_isolation_and_template_unchanged(sandboxes: Factory, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("top secret")
    rootfs = sandboxes.rootfs
    hostname_before = (rootfs / "etc/hostname").read_bytes()
    sbx = await sandboxes.boot()
    r = await sbx.run(["cat", str(secret)])
    assert r.exit_code != 0
    assert "top secret" not in r.stdout_text
    r = await sbx.run(["sh", "-c", "echo changed > /etc/hostname && echo new > /etc/bb-new && cat /etc/hostname"])
    assert r.exit_code == 0, r.stderr_text
    assert r.stdout_text == "changed\n"
    assert (rootfs / "etc/hostname").read_bytes() == hostname_before
    assert not (rootfs / "etc/bb-new").exists()
    upper_new = sbx.spec.upper_dir / "etc/bb-new"
    assert upper_new.read_text() == "new\n"
    assert upper_new.stat().st_uid == 100000  # uid 0 inside is 100000 outside
    r = await sbx.run(["sh", "-c", "id -u; cat /proc/self/uid_map; ls -n /etc/bb-new"])
    lines = r.stdout_text.splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "100000", "65536"]
    assert lines[2].split()[2:4] == ["0", "0"]
    r = await sbx.run(["sh", "-c", "ls -a /; cat /proc/1/cmdline"])
    assert ".branchbox" not in r.stdout_text.split()  # no host path is bound in: the agent runs from memory
    # the agent is a fork of the zygote: neither the host's command line nor its environment shows through
    assert "PYTEST_CURRENT_TEST" in os.environ
    r = await sbx.run(["sh", "-c", "cat /proc/1/cmdline /proc/1/environ; echo; head -c 16 /proc/1/mem"])
    assert "PYTEST_CURRENT_TEST" not in r.stdout_text
    assert "/work/main" not in r.stdout_text and "python" not in r.stdout_text
    assert "Permission denied" in r.stderr_text  # not dumpable: its memory cannot be read


PROBE = r"""
import ctypes, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
def err(r):
    return 0 if r == 0 else ctypes.get_errno()
class TS(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
out = {}
os.makedirs("/tmp/m", exist_ok=True)
out["mount"] = err(libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, None))
out["umount"] = err(libc.umount2(b"/proc", 2))
out["init_module"] = err(libc.syscall(175, None, 0, b""))
out["finit_module"] = err(libc.syscall(313, -1, b"", 0))
out["delete_module"] = err(libc.syscall(176, b"ext4", 0))
out["reboot"] = err(libc.syscall(169, 0xfee1dead, 672274793, 0, None))
out["sethostname"] = err(libc.sethostname(b"evil", 4))
out["clock_settime"] = err(libc.clock_settime(0, ctypes.byref(TS(int(time.time()) + 86400, 0))))
out["unshare_user"] = err(libc.unshare(0x10000000))
out["unshare_net"] = err(libc.unshare(0x40000000))
out["setns"] = err(libc.setns(0, 0))
out["bpf"] = err(libc.syscall(321, 0, None, 0))
out["keyctl"] = err(libc.syscall(250, 0, 0, 0, 0, 0))
out["chroot"] = err(libc.chroot(b"/"))
print(json.dumps(out))
"""


async def test_privileged_operations_are_denied(sandboxes: Factory) -> None:
    host_name = socket.gethostname()
    host_time = time.time()
    sbx = await sandboxes.boot()
    r = await sbx.py(PROBE)
    assert r.exit_code == 0, r.stderr_text
    res = json.loads(r.stdout_text)
    denied = {k: v for k, v in res.items() if k != "chroot"}
    assert all(v == 1 for v in denied.values()), res  # EPERM
    assert res["chroot"] == 0  # CAP_SYS_CHROOT is in Docker's default set
    assert socket.gethostname() == host_name
    assert abs(time.time() - host_time) < 3600
    r = await sbx.run(["sh", "-c", "grep Cap /proc/self/status; grep NoNewPrivs /proc/self/status"])
    caps = dict(line.split(":\t") for line in r.stdout_text.splitlines())
    assert caps["CapBnd"] == caps["CapEff"] == "00000000a80425fb"
    assert caps["CapAmb"] == "0000000000000000"
    assert caps["NoNewPrivs"] == "1"
    r = await sbx.run(["sh", "-c", "cat /proc/kcore /proc/keys /proc/timer_list 2>/dev/null | wc -c"])
    assert r.stdout_text.strip() == "0"
    r = await sbx.run(["sh", "-c", "echo 1 > /proc/sys/kernel/panic"])
    assert r.exit_code != 0


SOCKET_PROBE = r"""
import ctypes, errno, json, socket
libc = ctypes.CDLL(None, use_errno=True)
out = {}
params = ctypes.create_string_buffer(120)  # struct io_uring_params
out["io_uring_setup"] = 0 if libc.syscall(425, 4, params) >= 0 else ctypes.get_errno()
out["io_uring_enter"] = 0 if libc.syscall(426, 0, 0, 0, 0, None, 0) >= 0 else ctypes.get_errno()
out["io_uring_register"] = 0 if libc.syscall(427, 0, 0, None, 0) >= 0 else ctypes.get_errno()
def family(fam, kind, proto=0):
    try:
        socket.socket(fam, kind, proto).close()
        return 0
    except OSError as e:
        return e.errno
for name, fam, kind in [("unix", 1, 1), ("inet", 2, 1), ("inet6", 10, 2), ("netlink", 16, 3),
                        ("vsock", 40, 1), ("vsock_dgram", 40, 2), ("packet", 17, 3), ("xdp", 44, 3),
                        ("alg", 38, 5), ("key", 15, 3), ("future", 60, 1)]:
    out[name] = family(fam, kind)
out["inet_raw"] = family(2, 3, 1)  # ICMP, as ping opens it
# socket(2) by number with garbage in the upper half of the family register: the kernel reads AF_VSOCK
fd = libc.syscall(41, ctypes.c_long((1 << 32) | 40), 1, 0)
out["high_bits"] = 0 if fd >= 0 else ctypes.get_errno()
a = ctypes.c_int * 2
out["socketpair_vsock"] = 0 if libc.socketpair(40, 1, 0, a()) == 0 else ctypes.get_errno()
out["socketpair_unix"] = 0 if libc.socketpair(1, 1, 0, a()) == 0 else ctypes.get_errno()
print(json.dumps(out))
"""


async def test_seccomp_denies_io_uring_and_socket_families(sandboxes: Factory) -> None:
    """io_uring and every address family but unix, inet, inet6 and netlink get EPERM from the filter itself.

    Without the rules these calls reach the kernel: on this host io_uring_setup returns an fd, AF_PACKET and AF_XDP
    sockets open (the sandbox has CAP_NET_RAW in its own network namespace), AF_VSOCK answers ENODEV or opens, and
    absent families answer EAFNOSUPPORT, never EPERM.
    """
    sbx = await sandboxes.boot()
    r = await sbx.py(SOCKET_PROBE)
    assert r.exit_code == 0, r.stderr_text
    res = json.loads(r.stdout_text)
    allowed = {"unix", "inet", "inet6", "netlink", "inet_raw", "socketpair_unix"}
    assert {k: v for k, v in res.items() if k in allowed} == dict.fromkeys(allowed, 0), res
    assert {k: v for k, v in res.items() if k not in allowed} == {k: 1 for k in res if k not in allowed}, res  # EPERM


async def test_no_network_but_loopback(sandboxes: Factory) -> None:
    sbx = await sandboxes.boot()
    r = await sbx.py(
        "import socket, os;"
        "print(sorted(os.listdir('/sys/class/net')));"
        "s=socket.socket();s.bind(('127.0.0.1',0));s.listen();"
        "c=socket.create_connection(s.getsockname());print('lo-ok')"
    )
    assert r.exit_code == 0, r.stderr_text
    assert r.stdout_text.splitlines() == ["['lo']", "lo-ok"]
    r = await sbx.py("import socket;socket.create_connection(('1.1.1.1',53),timeout=2)")
    assert r.exit_code != 0
    assert "unreachable" in r.stderr_text.lower()


async def test_fork_bomb_stays_inside_pids_limit(sandboxes: Factory) -> None:
    bomb = await sandboxes.boot(pids=64)
    other = await sandboxes.boot()
    pids_dir = Path(bomb.handle.extra.get("cgroup.pids", bomb.handle.extra.get("cgroup.unified", "")))
    task = asyncio.create_task(
        bomb.run(
            ["python3", "-c", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"],
            timeout=5,
        )
    )
    try:
        saw_limit = await _eventually(lambda: int((pids_dir / "pids.current").read_text()) >= 60)
        assert saw_limit
        r = await other.run(["echo", "fine"])
        assert r.stdout_text == "fine\n"
        host = subprocess.run(["true"], check=False)
        assert host.returncode == 0
        assert int((pids_dir / "pids.current").read_text()) <= 64
    finally:
        with contextlib.suppress(Exception):
            await task
    # The agent's timeout killed the bomb's process group: the sandbox still answers.
    await bomb.run(["sh", "-c", "kill -9 -1 2>/dev/null; true"])
    assert await _eventually(lambda: int((pids_dir / "pids.current").read_text()) < 10)
    r = await bomb.run(["echo", "alive"])
    assert r.stdout_text == "alive\n"


async def test_memory_bomb_is_oom_killed_and_sandbox_survives(sandboxes: Factory) -> None:
    sbx = await sandboxes.boot(memory_mb=64)
    r = await sbx.py("x = []\nwhile True:\n    x.append(bytearray(1 << 20))")
    assert r.exit_code != 0
    assert r.signal == signal.SIGKILL or r.exit_code == 128 + signal.SIGKILL
    assert sbx.backend.is_alive(sbx.handle)
    r = await sbx.run(["echo", "still here"])
    assert r.stdout_text == "still here\n"
    mem = sbx.handle.extra.get("cgroup.memory")
    if mem:  # v1: the kill was the cgroup's OOM killer, not the host's
        stats = dict(line.split() for line in (Path(mem) / "memory.oom_control").read_text().splitlines())
        assert int(stats["oom_kill"]) >= 1


async def test_twenty_sandboxes_at_once(sandboxes: Factory) -> None:
    boxes = await asyncio.gather(*(sandboxes.boot() for _ in range(20)))
    results = await asyncio.gather(*(b.run(["hostname"]) for b in boxes))
    assert [r.stdout_text.strip() for r in results] == [b.spec.hostname for b in boxes]
    assert len({b.handle.pid for b in boxes}) == 20


async def test_half_failed_boot_leaves_nothing(backend: ContainerBackend, sandboxes: Factory) -> None:
    spec = sandboxes.spec(layers=[Path("/nonexistent/layer")])
    with pytest.raises(BackendError) as info:
        await backend.boot(spec, PhaseTimer())
    assert "lower layer /nonexistent/layer" in str(info.value)
    assert info.value.details["step"] == "open layers"
    assert spec.sandbox_id not in backend._cg().list_ids()
    assert not (spec.run_dir / "agent.sock").exists()
    await backend.destroy(spec.sandbox_id, None)  # idempotent
    await sandboxes.destroy(spec.sandbox_id)
    assert not spec.upper_dir.exists()


async def test_rootfs_without_python_works(backend: ContainerBackend, sandboxes: Factory, tmp_path: Path) -> None:
    """The agent is forked from the zygote, so an image needs no python (here: only a static busybox)."""
    busybox = Path("/bin/busybox")
    tiny = tmp_path / "tiny"
    (tiny / "bin").mkdir(parents=True)
    shutil.copy2(busybox, tiny / "bin/busybox")
    (tiny / "bin/sh").symlink_to("busybox")
    (tiny / "work").mkdir()
    shift_tree(tiny, IdMap())
    sbx = await sandboxes.boot(layers=[tiny])
    r = await sbx.run("echo hello from busybox; /bin/busybox id -u")
    assert r.exit_code == 0, r.stderr_text
    assert r.stdout_text.split() == ["hello", "from", "busybox", "0"]


async def test_pause_resume(backend: ContainerBackend, sandboxes: Factory) -> None:
    sbx = await sandboxes.boot()
    await backend.pause(sbx.handle)
    assert backend._cg().is_frozen(sbx.spec.sandbox_id)
    pending = asyncio.create_task(sbx.run(["echo", "after"]))
    await asyncio.sleep(0.2)
    assert not pending.done()  # a frozen agent cannot answer
    await backend.resume(sbx.handle)
    r = await pending
    assert r.stdout_text == "after\n"
    assert not backend._cg().is_frozen(sbx.spec.sandbox_id)


async def test_wait_exit_and_no_zombie(backend: ContainerBackend, sandboxes: Factory) -> None:
    sbx = await sandboxes.boot()
    waiter = asyncio.create_task(backend.wait_exit(sbx.handle))
    await asyncio.sleep(0)
    assert not waiter.done()
    os.kill(sbx.handle.pid, signal.SIGKILL)
    await asyncio.wait_for(waiter, 10)
    assert not backend.is_alive(sbx.handle)
    assert await _eventually(lambda: not Path(f"/proc/{sbx.handle.pid}").exists())  # reaped by the zygote


async def test_sandbox_survives_zygote_and_daemon_restart(
    backend: ContainerBackend, sandboxes: Factory, tmp_path: Path
) -> None:
    sbx = await sandboxes.boot()
    zygote = backend.zygote_pid
    assert zygote is not None
    os.kill(zygote, signal.SIGKILL)
    await backend.aclose()
    assert backend.is_alive(sbx.handle)
    r = await sbx.run(["echo", "up"])
    assert r.stdout_text == "up\n"
    # A "restarted daemon": a new backend object finds the sandbox by id.
    again = ContainerBackend(tmp_path / "run", cgroup_parent=backend.cgroup_parent)
    await again.start()
    try:
        assert again.is_alive(sbx.handle)
        assert sbx.spec.sandbox_id in again._cg().list_ids()
        removed = await again.cleanup_orphans(keep=set())
        assert removed == [sbx.spec.sandbox_id]
        assert await _eventually(lambda: not again.is_alive(sbx.handle))
        # boot still works on the new zygote
        await backend.start()
    finally:
        await again.aclose()


@pytest.mark.slow
async def test_create_destroy_200_times_leaves_nothing(backend: ContainerBackend, sandboxes: Factory) -> None:
    await sandboxes.close()
    mounts, fds = _mountinfo(), _fd_count()
    for _ in range(200):
        sbx = await sandboxes.boot()
        r = await sbx.run(["true"])
        assert r.exit_code == 0
        await sandboxes.destroy(sbx.spec.sandbox_id)
        assert not sbx.spec.run_dir.exists()
    assert _mountinfo() == mounts
    assert _fd_count() == fds
    left = backend._cg().list_ids()
    spares = {i for i in left if i.startswith(SPARE_PREFIX)}
    assert left == spares  # only the zygote's spare shells, which never pile up:
    assert len(spares) <= MAX_SPARES
    assert list(sandboxes.root.iterdir()) == []
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "bbagent" not in out


async def test_boot_records_phases(sandboxes: Factory, backend: ContainerBackend) -> None:
    """A burst larger than the spare shells: the first boots claim spares, the others make their own shell."""
    assert await _eventually_async(backend.zygote_status, lambda st: st["spares_ready"] == SPARES)
    specs = [sandboxes.spec() for _ in range(SPARES + 2)]
    timers = [PhaseTimer() for _ in specs]
    handles = await asyncio.gather(*(backend.boot(spec, t) for spec, t in zip(specs, timers, strict=True)))
    paths = set()
    for spec, handle, timer in zip(specs, handles, timers, strict=True):
        sandboxes.booted(spec.sandbox_id, handle)
        phases = timer.as_dict()
        for name in ("request", "init", "zygote_rtt"):
            assert name in phases
        assert ("cgroup" in phases) != ("shell" in phases and "unshare" in phases and "prime" in phases)
        paths.add("spare" if "cgroup" in phases else "own")
    assert paths == {"spare", "own"}


async def test_work_made_ahead_of_demand_runs_in_idle_cgroups(sandboxes: Factory, backend: ContainerBackend) -> None:
    """Spare shells and background (pool refill) boots wait in idle cgroups, so sandboxes next to them win the CPU
    (a nice value ranks tasks within one cgroup only); a user's boot, from a spare or its own shell, is not idle,
    and a background boot stops being idle when it is brought to the foreground (a pool claim)."""
    assert await _eventually_async(backend.zygote_status, lambda st: st["spares_ready"] == SPARES)
    cg = backend._cg()
    spares = [i for i in cg.list_ids() if i.startswith(SPARE_PREFIX)]
    assert spares
    assert all(cg.is_idle(i) for i in spares)
    specs = [sandboxes.spec() for _ in range(SPARES + 1)]  # the last one makes a shell of its own
    handles = await asyncio.gather(*(backend.boot(spec, PhaseTimer()) for spec in specs))
    for spec, handle in zip(specs, handles, strict=True):
        sandboxes.booted(spec.sandbox_id, handle)
        assert not cg.is_idle(spec.sandbox_id)
    spec = dataclasses.replace(sandboxes.spec(), background=True)
    handle = await backend.boot(spec, PhaseTimer())
    sandboxes.booted(spec.sandbox_id, handle)
    assert cg.is_idle(spec.sandbox_id)
    backend.foreground(handle)
    assert not cg.is_idle(spec.sandbox_id)


async def test_a_spare_shell_killed_from_outside_is_replaced(sandboxes: Factory, backend: ContainerBackend) -> None:
    assert await _eventually_async(backend.zygote_status, lambda st: st["spares_ready"] == SPARES)
    cg = backend._cg()
    spares = sorted(i for i in cg.list_ids() if i.startswith(SPARE_PREFIX))
    victims = cg.pids(spares[0])
    assert victims  # the holder waits in its cgroup
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    sbxs = [await sandboxes.boot() for _ in range(SPARES + 1)]  # more boots than spares: all still work
    for sbx in sbxs:
        assert (await sbx.run(["true"])).exit_code == 0
    assert await _eventually(lambda: spares[0] not in cg.list_ids())  # the dead spare's cgroup went
    # replaced: as many spares as before, or more (the boots above were a burst)
    assert await _eventually_async(backend.zygote_status, lambda st: st["spares_ready"] >= SPARES)


async def test_a_spare_sees_a_data_dir_mounted_after_it_was_made(
    sandboxes: Factory, backend: ContainerBackend, tmp_path: Path
) -> None:
    """Primed shells mount / as slaves: a filesystem the host mounts after they were made (here a tmpfs holding the
    sandbox's upper) reaches them, and the host can unmount it again once the sandbox is gone."""
    assert await _eventually_async(backend.zygote_status, lambda st: st["spares_ready"] >= SPARES)
    late = tmp_path / "mnt-late"  # mnt-: other workers' leak checks skip it
    late.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0711", "tmpfs", str(late)], check=True)
    try:
        sid = f"t{uuid.uuid4().hex[:10]}"
        upper, work, run = prepare_sandbox_dirs(late / sid, IdMap())
        spec = BootSpec(sandbox_id=sid, layers=[sandboxes.rootfs], upper_dir=upper, work_dir=work, run_dir=run,
                        hostname="late", resources=Resources())  # fmt: skip
        timer = PhaseTimer()
        handle = await backend.boot(spec, timer)
        sandboxes.made[sid] = (late / sid, handle, None)
        assert "cgroup" in timer.as_dict()  # it ran on a spare made before the mount
        client = await AgentClient.connect(handle.agent_socket)
        sandboxes.made[sid] = (late / sid, handle, client)
        r = await client.exec(["sh", "-c", "echo hi > /root/x && cat /root/x"])
        assert (r.exit_code, r.stdout) == (0, b"hi\n")
        assert (upper / "root" / "x").read_text() == "hi\n"  # written to the late filesystem
        await sandboxes.destroy(sid)
    finally:
        subprocess.run(["umount", str(late)], check=True)  # not pinned by the spares still waiting
