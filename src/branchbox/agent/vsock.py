"""The agent's entry in a microVM whose host has vhost-vsock: the agent of ``server`` (same methods, same protocol)
serving an ``AF_VSOCK`` listening socket on port ``BRANCHBOX_VSOCK_PORT`` (any CID) instead of a unix socket or
a virtio-serial port. Every host connection is an accepted connection, as with a unix socket.

Stdlib only; copied into the guest's initrd next to ``server`` and ``wire`` (``bbagent.vsock``) and started by
the guest shim when the kernel command line has ``bb.vsock=PORT``. After a restore into a VM with another guest
CID the guest driver re-reads its CID and resets open connections; the listening socket bound to any CID keeps
accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys

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


async def serve_listener(sock: socket.socket, env: dict[str, str], workdir: str) -> None:
    """Serve the agent on every connection ``sock`` (any listening stream socket) accepts, until SIGTERM/SIGINT."""
    agent = server.Agent(env, workdir)
    loop = agent.loop
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    stop = loop.create_future()

    def on_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    agent.reap()
    srv = await loop.create_server(lambda: server.Connection(agent), sock=sock)
    try:
        await stop
    finally:
        srv.close()
        for proc in list(agent.procs.values()):
            if proc.exit_code is None:
                proc.kill(signal.SIGKILL)


def main() -> None:
    """Guest entry: ``BRANCHBOX_VSOCK_PORT``, and ``BRANCHBOX_ENV``/``BRANCHBOX_WORKDIR`` as for ``server``."""
    port = int(os.environ["BRANCHBOX_VSOCK_PORT"])
    raw = json.loads(os.environ.get("BRANCHBOX_ENV") or "{}")
    env = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    env.setdefault("PATH", server.DEFAULT_PATH)
    workdir = os.environ.get("BRANCHBOX_WORKDIR") or "/"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_listener(listen(port), env, workdir))
    if os.getpid() == 1:
        print("branchbox agent: exiting", file=sys.stderr)
