"""veth pairs: the host end (``<prefix><slot>``, address .1 of the slot) and ``eth0`` in the sandbox's network
namespace (address .2, default route via .1), made with two ``ip -batch`` runs (~5 ms, on the warm pool's boot
path, never on a claim). Deleting the host end deletes both ends.
"""

from __future__ import annotations

import asyncio
import os

from branchbox.errors import NetworkError
from branchbox.net.addresses import Slot

IP_TIMEOUT_S = 30.0


async def _run(argv: list[str], script: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise NetworkError(f"{argv[0]} is not installed: apt-get install iproute2 util-linux") from exc
    try:
        async with asyncio.timeout(IP_TIMEOUT_S):
            _, err = await proc.communicate(script.encode())
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise NetworkError(f"{' '.join(argv)} did not finish in {IP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}", script=script)


async def create_veth(host_if: str, slot: Slot, netns_pid: int) -> None:
    """Make the pair with its addresses and routes; on failure nothing is left."""
    host = (
        f"link add {host_if} type veth peer name eth0 netns {netns_pid}\n"
        f"addr add {slot.host}/{slot.prefixlen} dev {host_if}\n"
        f"link set {host_if} up\n"
    )
    inner = (
        f"addr add {slot.sandbox}/{slot.prefixlen} dev eth0\n"
        "link set eth0 up\n"
        f"route add default via {slot.host} dev eth0\n"
    )
    await _run(["ip", "-batch", "-"], host)
    try:
        await _run(["nsenter", f"--net=/proc/{netns_pid}/ns/net", "ip", "-batch", "-"], inner)
    except BaseException:
        await delete_veth(host_if)
        raise


async def delete_veth(host_if: str) -> None:
    """Remove the pair if it still exists (it also goes by itself when the sandbox's namespace dies)."""
    if not veth_exists(host_if):
        return
    proc = await asyncio.create_subprocess_exec(
        "ip", "link", "del", host_if, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await proc.wait()


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
