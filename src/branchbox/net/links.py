"""veth pairs: the host end (``<prefix>-<slot>``, address .1 of the slot) and ``eth0`` in the sandbox's network
namespace (address .2, default route via .1), made in-process with rtnetlink (:mod:`branchbox.net.netlink`).

The netlink work runs on a fresh thread per call: the steps inside the sandbox's namespace ``setns`` that thread,
and a thread that (against all odds) could not get back to the host's namespace is never reused. Deleting the
host end deletes both ends (the kernel also deletes them when the sandbox's namespace goes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import branchbox.net.netlink as netlink
from branchbox.errors import NetworkError
from branchbox.net.addresses import Slot

T = TypeVar("T")
GONE_TIMEOUT_S = 10.0  # a veth the kernel removes with its namespace: how long its name may stay taken


async def _on_fresh_thread(fn: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="branchbox-netlink", daemon=True).start()
    return await fut


async def loopback_socket(netns_pid: int) -> socket.socket:
    """An unconnected TCP socket in the namespace of ``netns_pid``: connect it to 127.0.0.1 to reach that
    namespace's loopback (made on a fresh thread, as the veth's inner steps)."""
    return await _on_fresh_thread(lambda: netlink.tcp_socket_in(netns_pid))


async def create_veth(host_if: str, slot: Slot, netns_pid: int) -> None:
    """Make the pair with its addresses and routes; on failure nothing is left."""
    host = ipaddress.IPv4Interface(f"{slot.host}/{slot.prefixlen}")
    inner = ipaddress.IPv4Interface(f"{slot.sandbox}/{slot.prefixlen}")
    try:
        await _on_fresh_thread(lambda: netlink.wire_veth(host_if, host, inner, netns_pid))
    except OSError as exc:
        raise NetworkError(f"wiring the network of pid {netns_pid} ({host_if}) failed: {exc}") from exc


async def delete_veth(host_if: str) -> None:
    """Remove the pair if it still exists; return once its name is free for the next sandbox of the slot.

    The kernel removes the pair by itself when the sandbox's namespace goes (its last process exited), in a work
    queue of its own: the device may then be past deleting (the delete finds none) but still listed, its name
    taken, for a while; under load that is tens of milliseconds."""
    if not veth_exists(host_if):
        return
    try:
        await _on_fresh_thread(lambda: netlink.delete_link(host_if))
    except OSError as exc:
        raise NetworkError(f"deleting {host_if} failed: {exc}") from exc
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while veth_exists(host_if):
        if time.monotonic() > deadline:
            raise NetworkError(f"{host_if} is still listed {GONE_TIMEOUT_S:.0f} s after it was deleted")
        await asyncio.sleep(0.005)


def veth_exists(host_if: str) -> bool:
    return os.path.exists(f"/sys/class/net/{host_if}")


def set_ip_forward() -> bool:
    """Enable IPv4 forwarding (a host-wide setting); return whether it was off before."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        was = f.read().strip()
    if was != "1":
        with open(path, "w") as f:
            f.write("1")
    return was != "1"
