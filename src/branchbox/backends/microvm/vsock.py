"""The agent channel over vsock, on hosts with vhost-vsock: probe, guest CIDs, the QEMU device.

A VM gets a ``vhost-vsock-device`` (virtio-mmio) with its own guest CID; the guest agent listens on
``AGENT_PORT`` (any CID) and the host connects ``AF_VSOCK`` to ``(cid, AGENT_PORT)`` with the same agent protocol
as over virtio-serial. Unlike a virtio-serial port, every host connection is a real connection.

CIDs are unique per host (the kernel refuses a CID another VM holds). The daemon opens ``/dev/vhost-vsock`` itself,
claims a random free CID on it (``VHOST_VSOCK_SET_GUEST_CID``) and hands the descriptor to QEMU (``vhostfd``): the
CID is held from the claim until QEMU exits, with no window in which two VMs can pick the same one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import struct

from branchbox.errors import BackendError

DEVICE = "/dev/vhost-vsock"
AGENT_PORT = 5252
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # _IOW(VHOST_VIRTIO=0xAF, 0x60, __u64)
FIRST_CID = 3  # 0-2 are reserved (hypervisor, local, host)
LAST_CID = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_CID_ANY
CLAIM_TRIES = 64


def probe() -> str | None:
    """None when this host can give a VM a vsock device, else what is missing (said in the log and in skips).

    Opens ``/dev/vhost-vsock`` read-write as QEMU would (the node may exist without a usable driver) and makes
    an ``AF_VSOCK`` socket (the host side of every agent connection)."""
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no AF_VSOCK"
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{DEVICE}: {exc.strerror} (the host kernel needs the vhost_vsock module)"
    os.close(fd)
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"AF_VSOCK sockets: {exc.strerror}"
    return None


def claim_cid() -> tuple[int, int]:
    """``(fd, cid)``: an open ``/dev/vhost-vsock`` holding a guest CID no other VM on this host has.

    The caller passes ``fd`` to QEMU (``vhost-vsock-device,vhostfd=N,guest-cid=cid``) and closes its own copy."""
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"cannot open {DEVICE} for the VM's vsock device: {exc.strerror}") from exc
    try:
        return fd, _claim(fd)
    except BaseException:
        os.close(fd)
        raise


def _claim(fd: int) -> int:
    for _ in range(CLAIM_TRIES):
        cid = FIRST_CID + secrets.randbelow(LAST_CID - FIRST_CID + 1)
        try:
            fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # another VM (or this host's own CID) has it
                continue
            raise BackendError(f"cannot set a guest CID on {DEVICE}: {exc.strerror}") from exc
        return cid
    raise BackendError(f"no free vsock CID after {CLAIM_TRIES} random tries")


def device_args(cid: int, fd: int) -> list[str]:
    """QEMU arguments of the vsock device using the claimed ``fd`` (its number in QEMU's process)."""
    return ["-device", f"vhost-vsock-device,guest-cid={cid},vhostfd={fd}"]


def read_cid(path: os.PathLike[str] | str) -> int | None:
    """The CID written next to a VM (``vsock_cid`` in its run dir), or None."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        return int(f.read().strip())
    return None
