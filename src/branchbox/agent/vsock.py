"""The agent's entry in a microVM whose host has vhost-vsock: the agent of ``server`` (same methods, same protocol)
serving an ``AF_VSOCK`` listening socket on port ``BRANCHBOX_VSOCK_PORT`` (any CID) instead of a unix socket or
a virtio-serial port. Every host connection is an accepted connection, as with a unix socket.

Stdlib only; copied into the guest's initrd next to ``server`` and ``wire`` (``bbagent.vsock``) and started by
the guest shim when the kernel command line has ``bb.vsock=PORT``. After a restore into a VM with another guest
CID the guest driver re-reads its CID and resets open connections; the listening socket bound to any CID keeps
accepting.
"""

from __future__ import annotations

import os
import socket

from . import server


def listen(port: int, backlog: int = 16) -> socket.socket:
    """A listening AF_VSOCK stream socket on ``port`` of every CID."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def main() -> None:
    """Guest entry: serve ``server``'s agent on ``BRANCHBOX_VSOCK_PORT`` (``BRANCHBOX_ENV`` and ``BRANCHBOX_WORKDIR``
    as for ``server``)."""
    os.environ["BRANCHBOX_LISTEN_FD"] = str(listen(int(os.environ["BRANCHBOX_VSOCK_PORT"])).detach())
    server.main()
