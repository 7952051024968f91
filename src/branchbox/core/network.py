"""Sandbox networking as the Manager sees it: the egress policy of a create, wiring a booted sandbox (veth + /30
+ nftables chain, ``branchbox.net``) while its agent connects, and reading or changing a policy live.
docs/networking.md."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from branchbox.agentclient.client import AgentClient
from branchbox.backends.base import Backend, SandboxHandle
from branchbox.core.runtime import Live, Runtime
from branchbox.errors import NotSupportedError
from branchbox.models import SandboxState
from branchbox.net import Attachment, NetworkPolicy
from branchbox.timing import PhaseTimer


class NetworkService:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def get_network(self, sandbox_id: str) -> Attachment:
        """The sandbox's address and egress policy."""
        live = self.rt.require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        return self.attachment(live)

    async def loopback_socket(self, sandbox_id: str) -> socket.socket | None:
        """An unconnected TCP socket in the sandbox's own network namespace, so that 127.0.0.1 is the sandbox's
        loopback (the port proxy's way to servers bound to it); None where the sandbox's loopback is out of the
        host's reach (a microVM's is in its guest kernel) or it has no network of its own."""
        live = self.rt.require(sandbox_id, SandboxState.RUNNING)
        net = self.rt.net
        if net is None or net.find(sandbox_id) is None:
            return None
        return await net.loopback_socket(live.handle.pid)

    async def update_network(self, sandbox_id: str, patch: Mapping[str, Any]) -> Attachment:
        """Change the egress policy of a running sandbox: keys of ``patch`` (``allow_out``, ``deny_out``,
        ``allow_internet_access``) replace the current values, absent keys stay. Applies at once, also to open
        connections."""
        live = self.rt.require(sandbox_id, SandboxState.RUNNING, SandboxState.PAUSED)
        att = self.attachment(live)
        self.set_policy(live, att.policy.updated(patch))
        self.rt.db.update(sandbox_id, handle=live.handle)
        return att

    def attachment(self, live: Live) -> Attachment:
        att = self.rt.net.find(live.info.id) if self.rt.net is not None else None
        if att is None:
            raise NotSupportedError(
                f"sandbox {live.info.id} has no network: networking is off in this daemon (set network = true)"
            )
        return att

    def policy_of(self, sandbox_id: str) -> NetworkPolicy | None:
        """The egress policy a sandbox has now (None: it has no network): what its forks and resets keep."""
        attached = self.rt.net.find(sandbox_id) if self.rt.net is not None else None
        return attached.policy if attached is not None else None

    def policy_for(self, be: Backend, internet: bool | None, network: Mapping[str, Any] | None) -> NetworkPolicy | None:
        """Validate the create() network arguments; None when the sandbox gets no network."""
        if self.rt.net is None or not be.capabilities.network:
            if internet or network:
                raise NotSupportedError(
                    "this daemon gives sandboxes no network (loopback only): enable networking (network = true) "
                    "or drop allow_internet_access/network"
                )
            return None
        return NetworkPolicy.of(internet, network)

    async def wire_and_connect(
        self, be: Backend, handle: SandboxHandle, policy: NetworkPolicy, timer: PhaseTimer
    ) -> tuple[SandboxHandle, AgentClient]:
        """The network and the agent's connection at once: the kernel wires the veth (on a thread of its own)
        while the agent answers. The phases overlap, so they add up to more than the time both took."""

        async def wire() -> SandboxHandle:
            with timer.phase("network"):
                return await self._attach(handle, policy)

        wiring = asyncio.ensure_future(wire())
        try:
            with timer.phase("agent_connect"):
                agent = await self.rt.connect_agent(be, handle)
        except BaseException:
            await asyncio.gather(wiring, return_exceptions=True)  # an attachment made is detached by the cleanup
            raise
        try:
            wired = await wiring
        except BaseException:
            await agent.aclose()
            raise
        return wired, agent

    async def _attach(self, handle: SandboxHandle, policy: NetworkPolicy) -> SandboxHandle:
        assert self.rt.net is not None
        att = await self.rt.net.attach(handle.sandbox_id, handle.pid, policy)
        return replace(handle, extra={**handle.extra, **att.extra()})

    def set_policy(self, live: Live, policy: NetworkPolicy) -> None:
        """Apply ``policy`` if it differs (one in-process nftables transaction) and keep it in the handle."""
        att = self.attachment(live)
        if att.policy == policy:
            return
        self.rt.net.apply(live.info.id, policy)  # type: ignore[union-attr]
        live.handle = replace(live.handle, extra={**live.handle.extra, **att.extra()})
