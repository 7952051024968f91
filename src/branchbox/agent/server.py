"""The in-sandbox agent: serves exec, processes, pty and files over the framed protocol in ``wire``.

Runs as PID 1 (or under a tiny init) on the sandbox's own python3, stdlib only. Started with a listening
unix socket on fd ``BRANCHBOX_LISTEN_FD`` (default 3) or a character device ``BRANCHBOX_CHARDEV`` (a microVM's
virtio-serial port, see :class:`CharDevice`), the base environment of every child in
``BRANCHBOX_ENV`` (JSON) and the default working directory in ``BRANCHBOX_WORKDIR``. Event-driven: one asyncio
loop, one SIGCHLD handler that reaps every child (orphans too), readers/writers on pipes, no polling.
See docs/agent-protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from .chardev import CharDevice
from .handlers import METHODS, write_host_files
from .protocol import Connection
from .shell import DEFAULT_PATH
from .supervise import Agent


async def serve(listen_fd: int, env: dict[str, str], workdir: str, chardev: str | None = None) -> None:
    """Serve connections on the listening socket ``listen_fd`` (or sessions on the character device
    ``chardev``) until SIGTERM/SIGINT."""
    if os.getpid() == 1:  # the sandbox's init (never a test's agent on the host): before the first request
        write_host_files(socket.gethostname())
    agent = Agent(env, workdir)
    loop = agent.loop
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    stop = loop.create_future()

    def on_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    agent.reap()
    try:
        if chardev is not None:
            device = CharDevice(loop, chardev, agent, METHODS)
            try:
                await stop
            finally:
                device.end_session()
        else:
            sock = socket.socket(fileno=listen_fd)  # any listening stream socket: unix, or AF_VSOCK in a microVM
            sock.setblocking(False)
            server = await loop.create_server(lambda: Connection(agent, METHODS), sock=sock)
            try:
                await stop
            finally:
                server.close()
    finally:
        for proc in list(agent.procs.values()):
            if proc.exit_code is None:
                proc.kill(signal.SIGKILL)


def base_env(raw: object) -> dict[str, str]:
    env = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


Claim = Callable[[bytes, list[int]], tuple[int, dict[str, str], str]]
WarmUp = Callable[[socket.socket], Awaitable[None]]
"""Runs one exec through a host-side client on the given end of a socket pair (the container backend's; the
guest package holds no client)."""


def run_primed(ctl_fd: int, claim: Claim, *, max_fds: int, ready: Callable[[], None], warm_up: WarmUp | None) -> None:
    """Start the agent's loop before there is anything to serve (a container backend's spare shell), then wait
    for one request on the SOCK_SEQPACKET socket ``ctl_fd``: ``claim(request, descriptors)`` makes the sandbox
    around this process and returns the listening fd, base environment and workdir; the agent answers ``b"ok"``
    on ``ctl_fd``, closes it and serves. EOF before a request: exit. The start-up work (loop, signal handlers,
    the pages a fork of the zygote copies on first write) is then off the boot path; with ``warm_up`` (an exec
    through a client, on a socket pair served by a throwaway agent) so are the pages of a first connection and
    exec. ``ready()`` is called once it is done."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_primed(ctl_fd, claim, max_fds, ready, warm_up))


async def _primed(ctl_fd: int, claim: Claim, max_fds: int, ready: Callable[[], None], warm_up: WarmUp | None) -> None:
    loop = asyncio.get_running_loop()
    if warm_up is not None:
        with contextlib.suppress(Exception):  # a warm-up that fails costs speed only
            await _warm_up(warm_up)
    ready()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(ctl_fd, wake)
    await readable
    loop.remove_reader(ctl_fd)
    ctl = socket.socket(fileno=ctl_fd)
    raw, fds, _, _ = socket.recv_fds(ctl, 1 << 20, max_fds, socket.MSG_CMSG_CLOEXEC)
    if not raw:
        os._exit(0)
    listen_fd, env, workdir = claim(raw, fds)
    with contextlib.suppress(OSError):  # the zygote is gone: the boot failed, the daemon removes this sandbox
        ctl.send(b"ok")
    ctl.close()
    await serve(listen_fd, base_env(env), workdir or "/")


async def _warm_up(run: WarmUp) -> None:
    """One exec through a real connection on a socket pair, served by a throwaway Agent. A primed agent is a fork
    of the zygote: the pages its first connection and first exec write are copied now, not on the boot path."""
    loop = asyncio.get_running_loop()
    agent = Agent({"PATH": DEFAULT_PATH}, "/")
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    ours, theirs = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: Connection(agent, METHODS), ours)
        try:
            await run(theirs)
        finally:
            transport.close()
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)
        os.close(agent.devnull)
        os.close(agent.home)
        if agent.oom.fd >= 0:
            os.close(agent.oom.fd)


def main() -> None:
    """Entry point: settings from the environment (see the module docstring)."""
    listen_fd = int(os.environ.get("BRANCHBOX_LISTEN_FD", "3"))
    env = base_env(json.loads(os.environ.get("BRANCHBOX_ENV") or "{}"))
    workdir = os.environ.get("BRANCHBOX_WORKDIR") or "/"
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen_fd, env, workdir, os.environ.get("BRANCHBOX_CHARDEV") or None))
    if os.getpid() == 1:
        print(f"branchbox agent: exiting after {time.monotonic() - started:.1f} s", file=sys.stderr)
