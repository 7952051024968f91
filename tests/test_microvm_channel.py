"""The microVM's agent channel and guest settings without a VM: the vsock entry of the agent (served on a real
listening socket), the QEMU command line per channel, handle addresses, template keys, thread priorities."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import branchbox.agent
from branchbox.agent import vsock as entry
from branchbox.agent import wire
from branchbox.agentclient.client import AgentClient
from branchbox.backends.base import SandboxHandle
from branchbox.backends.microvm import accel, qemu, vsock
from branchbox.backends.microvm.config import config_from_env
from branchbox.core import store
from branchbox.errors import AgentDisconnectedError, BackendError, TimeoutError_

AGENT_SRC = Path(__file__).resolve().parents[1] / "src" / "branchbox" / "agent"
GUARD = 60  # seconds: only a hang guard, never asserted on
BOOT = """\
import asyncio, socket, sys
sys.path[:0] = [{dir!r}]
from bbagent import server, vsock  # vsock.main: server.serve on the listening socket it made
asyncio.run(server.serve({fd}, {{"PATH": "/usr/bin:/bin", "BASE": "b"}}, {workdir!r}))
"""


def skip_without_af_vsock() -> None:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            pytest.skip("this kernel has no AF_VSOCK sockets (vsock module)")
        raise


def machine(agent: str, cmdline: str = "console=ttyS0") -> qemu.Machine:
    return qemu.Machine(vcpus=1, memory_mb=256, accel="tcg", kernel=Path("/k"), initrd=Path("/i/abc.cpio"),
                        cmdline=cmdline, agent=agent)  # fmt: skip


@pytest.fixture
def vsock_entry(tmp_path: Path) -> Iterator[Path]:
    """The guest's ``bbagent.vsock`` entry serving a listening unix socket (AF_VSOCK needs a guest): its path."""
    pkg = tmp_path / "code" / "bbagent"
    pkg.mkdir(parents=True)
    for name in branchbox.agent.FILES:
        shutil.copy(AGENT_SRC / name, pkg / name)
    path = tmp_path / "agent.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    code = BOOT.format(dir=str(tmp_path / "code"), fd=sock.fileno(), workdir=str(tmp_path))
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", code], pass_fds=(sock.fileno(),))
    finally:
        sock.close()
    try:
        yield path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(GUARD)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


async def test_vsock_entry_serves_the_protocol_to_every_connection(vsock_entry: Path) -> None:
    a = await AgentClient.connect(vsock_entry, timeout=GUARD, open_session=True)  # as the microVM backend does
    b = await AgentClient.connect(vsock_entry, timeout=GUARD)  # the agent's own HELLO on an accepted connection
    try:
        r = await a.exec("echo $BASE; pwd")
        assert r.exit_code == 0 and r.stdout == f"b\n{vsock_entry.parent}\n".encode()
        slow = await b.spawn(["sleep", "30"])
        assert [p.pid for p in await a.list_processes()] == [slow.pid]  # one agent behind both connections
        await a.kill(slow.pid, signal.SIGKILL)
    finally:
        await a.aclose()
        await b.aclose()


def test_vsock_listen_binds_every_cid_on_the_port() -> None:
    skip_without_af_vsock()
    sock = entry.listen(52521)
    try:
        assert sock.family == socket.AF_VSOCK
        assert sock.getsockname() == (socket.VMADDR_CID_ANY, 52521)
        assert not sock.getblocking()
        with pytest.raises(OSError) as info:
            entry.listen(52521)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        sock.close()


def test_command_line_per_agent_channel(tmp_path: Path) -> None:
    paths = qemu.VmPaths(dir=tmp_path, ram=tmp_path / "vm.ram")
    serial = qemu.command(machine("serial"), paths, incoming=False)
    assert "virtserialport,chardev=agent,name=agent" in serial
    assert not any("vsock" in a for a in serial)
    vs = qemu.command(machine("vsock"), paths, incoming=True, vsock_cid=4711)
    assert f"vhost-vsock-device,guest-cid=4711,vhostfd={qemu.VSOCK_FD}" in vs
    assert not any("virtserial" in a or "virtio-serial" in a for a in vs)
    assert vs[-2:] == ["-incoming", "defer"]
    with pytest.raises(ValueError, match="guest CID"):
        qemu.command(machine("vsock"), paths, incoming=False)


def test_handle_agent_address_survives_the_store() -> None:
    plain = SandboxHandle("s1", 10, 20, Path("/run/a.sock"), extra={"vm_dir": "/x"})
    assert plain.agent_address == Path("/run/a.sock")
    vs = SandboxHandle("s2", 10, 20, Path("/run/b.sock"), extra={"agent_vsock": "4711:5252"})
    assert vs.agent_address == wire.VsockAddress(4711, 5252)
    back = store._handle_from_json(store._handle_to_json(vs))
    assert back is not None and back.agent_address == wire.VsockAddress(4711, 5252)
    assert str(wire.VsockAddress.parse("3:1024")) == "3:1024"


def test_memory_template_key_covers_the_kernel_command_line() -> None:
    a, b = machine("serial", "console=ttyS0 norandmaps"), machine("serial", "console=ttyS0")
    assert a.key() != b.key()
    assert machine("vsock", "x bb.vsock=5252").key() != machine("serial", "x").key()
    # the guest image and boot parameters stay one dash-separated part: stale-template removal keys on the rest
    assert a.key().rsplit("-", 1)[0] == b.key().rsplit("-", 1)[0] == "tcg-1c-256m"


def test_the_kvm_probe_loads_the_jails_seccomp_filter() -> None:
    """The accelerator probe is the one QEMU started outside the jail (branchbox's own kernel and initrd, no disk,
    no network, no sandbox input, once per host): it still runs with the VMs' -sandbox options."""
    from branchbox.backends.microvm.image import GuestImages

    argv = accel.probe_argv(GuestImages(Path("/k/vmlinux"), Path("/i/x.cpio"), "r"), Path("/t/console.log"))
    assert argv[argv.index("-sandbox") + 1] == qemu.SECCOMP
    assert {"obsolete=deny", "elevateprivileges=deny", "spawn=deny"} <= set(qemu.SECCOMP.split(","))
    assert "-drive" not in argv and "-netdev" not in argv and "-device" not in argv


def test_tcg_guests_run_without_aslr_where_it_is_expensive() -> None:
    assert "norandmaps" in accel.guest_cmdline("tcg").split()
    assert "norandmaps" not in accel.guest_cmdline("tcg", tcg_aslr=True).split()
    assert "norandmaps" not in accel.guest_cmdline("kvm").split()
    assert not accel.keeps_aslr(None, (7, 2)) and accel.keeps_aslr(None, (10, 0))
    assert accel.keeps_aslr(True, (7, 2)) and not accel.keeps_aslr(False, (10, 1))


@pytest.mark.skipif(not shutil.which(qemu.QEMU), reason="qemu-system-x86_64 is not installed (make apt)")
def test_qemu_version_is_read() -> None:
    assert qemu.version() >= (7, 0)
    assert qemu.version("/bin/false") == (0, 0)


def test_set_nice_reaches_every_thread() -> None:
    code = "import threading,time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(60,)).start()\n"
    code += "print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        qemu.set_nice(proc.pid, 7)
        tasks = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tasks) == 4
        for t in tasks:
            assert os.getpriority(os.PRIO_PROCESS, int(t)) == 7
        qemu.set_nice(proc.pid, 0)
        assert all(os.getpriority(os.PRIO_PROCESS, int(t)) == 0 for t in tasks)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    qemu.set_nice(proc.pid, 0)  # a process that is gone: nothing to do, no error


def test_agent_channel_setting_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRANCHBOX_VM_AGENT", "carrier-pigeon")
    with pytest.raises(BackendError, match="vsock, serial or auto"):
        config_from_env(tmp_path)
    monkeypatch.setenv("BRANCHBOX_VM_AGENT", "serial")
    assert config_from_env(tmp_path).agent_channel == "serial"


def test_vsock_probe_says_what_is_missing() -> None:
    why = vsock.probe()
    can_open = True
    try:
        os.close(os.open(vsock.DEVICE, os.O_RDWR))
    except OSError:
        can_open = False
    assert (why is None) == can_open
    if why is not None:
        assert vsock.DEVICE in why or "AF_VSOCK" in why


async def test_vsock_connect_to_nobody_is_an_agent_error() -> None:
    skip_without_af_vsock()
    # CID 1 is the local CID: with no loopback transport or nobody listening, connecting fails fast or times out
    with pytest.raises((AgentDisconnectedError, TimeoutError_)) as info:
        await AgentClient.connect(wire.VsockAddress(1, 52522), timeout=3)
    assert "vsock 1:52522" in str(info.value)


def test_a_cid_claim_on_something_else_than_vhost_vsock_is_a_backend_error() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(BackendError, match="cannot set a guest CID"):
            vsock._claim(fd)  # the real ioctl, refused by a device that is not vhost-vsock
    finally:
        os.close(fd)
    assert vsock.device_args(7, 4) == ["-device", "vhost-vsock-device,guest-cid=7,vhostfd=4"]
