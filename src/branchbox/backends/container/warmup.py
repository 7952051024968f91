"""The warm-up of a primed spare shell (``agent.server.run_primed``): one exec through the host's agent client on
a socket pair served by a throwaway agent, so the pages a first connection and exec write are copied before the
shell is claimed. Host-side code (the guest package holds no client); the zygote preloads it."""

from __future__ import annotations

import socket

from branchbox.agentclient.client import AgentClient


async def exec_true(sock: socket.socket) -> None:
    """Run ``true`` through an agent client on ``sock`` (closed when done)."""
    client = await AgentClient.over_socket(sock)
    try:
        await client.exec(["true"], timeout=10)
    finally:
        await client.aclose()
