"""Personalising a sandbox through its agent, for backends whose sandboxes are clones of a running machine
(``Capabilities.agent_session``: microVMs restored from memory). One pipelined round trip."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from branchbox.agentclient.client import AgentClient


async def personalise(
    agent: AgentClient,
    *,
    hostname: str,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
) -> None:
    """A unique clone: hostname, a new machine-id, the RNG reseeded from the host, the wall clock set; then the
    base environment and working directory (when given)."""
    calls: list[Awaitable[Any]] = [
        agent.identity(hostname=hostname, machine_id=secrets.token_hex(16), entropy=os.urandom(32), clock=time.time())
    ]
    if env or (workdir not in (None, "/")) or user is not None:
        calls.append(agent.configure(env=env, workdir=workdir, user=user))
    await asyncio.gather(*calls)
