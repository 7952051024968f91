"""The protocol every isolation backend implements, and the data it exchanges with the core.

A backend only manages a sandbox's *lifecycle* (boot, pause, resume, destroy, re-attach). Everything that happens
*inside* a sandbox goes through the agent protocol (:mod:`branchbox.agent`), the same for every backend: a backend
hands the core the path of a unix socket on which the in-sandbox agent listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from branchbox.agent.wire import VsockAddress
from branchbox.models import Resources
from branchbox.timing import PhaseTimer


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """An immutable layer on disk (made by a storage driver, booted by a backend). Sizes are ``None`` when not
    measured yet (measured off the hot path)."""

    path: Path
    size_bytes: int | None = None
    files: int | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do. Callers check these instead of catching NotImplementedError."""

    pause: bool = False
    fs_snapshot: bool = False
    memory_snapshot: bool = False
    fork: bool = False  # filesystem fork (container) or memory fork (microvm, when memory_snapshot)
    network: bool = False  # each sandbox has its own network namespace that the Manager may wire (branchbox.net)
    # the agent's stream is a character device relayed by a VMM: the host opens each session with HELLO, and sets
    # hostname/identity/env through the agent after boot (AgentClient.identity / configure), not set_hostname
    agent_session: bool = False


@dataclass(frozen=True, slots=True)
class IdMap:
    """Root inside a sandbox maps to ``host_base`` on the host; ``count`` ids are mapped."""

    host_base: int = 100000
    count: int = 65536


@dataclass(frozen=True, slots=True)
class BootSpec:
    """Everything a backend needs to boot one sandbox. Paths are host paths."""

    sandbox_id: str
    layers: Sequence[Path]  # read-only lower layers, topmost first (the template rootfs is last)
    upper_dir: Path  # writable overlay upper, owned by idmap.host_base
    work_dir: Path  # overlay work dir, same filesystem as upper_dir
    run_dir: Path  # host-only directory for the agent socket and backend bookkeeping (not visible inside)
    hostname: str
    resources: Resources
    env: Mapping[str, str] = field(default_factory=dict)  # base environment of every process the agent starts
    workdir: str = "/"
    idmap: IdMap = field(default_factory=IdMap)
    # the host uid of root in the range each lower layer's files are owned by (same order as ``layers``; empty:
    # all in ``idmap``'s range). A layer in another range is mounted through an idmapped mount (issue 22.1)
    layer_bases: Sequence[int] = ()
    network: bool = False  # True: the Manager wires a veth into the init's own network namespace after boot
    background: bool = False  # boot at low CPU priority (warm pool refills must not slow users' sandboxes)
    memory_snapshot: Path | None = None  # a memory snapshot layer to continue from (capabilities.memory_snapshot)


@dataclass(frozen=True, slots=True)
class SandboxHandle:
    """What the core keeps (and persists) about a booted sandbox to talk to it and re-attach after a restart."""

    sandbox_id: str
    pid: int  # host pid of the sandbox's init (the agent for containers, QEMU for microVMs)
    pid_start_time: int  # from /proc/PID/stat field 22; guards against pid reuse after a restart
    agent_socket: Path
    extra: Mapping[str, str] = field(default_factory=dict)  # backend-specific (cgroup paths, ...)

    @property
    def agent_address(self) -> Path | VsockAddress:
        """Where to connect to the agent: ``agent_socket``, or ``extra["agent_vsock"]`` (``CID:PORT``) for a
        microVM whose agent listens on vsock."""
        vsock = self.extra.get("agent_vsock")
        return self.agent_socket if vsock is None else VsockAddress.parse(vsock)


class Backend(Protocol):
    """An isolation technology. Methods are idempotent where the docstring says so."""

    name: str
    capabilities: Capabilities

    async def start(self) -> None:
        """Prepare host-wide resources (helper processes, parent cgroups). Called once by the Manager."""

    async def boot(self, spec: BootSpec, timer: PhaseTimer) -> SandboxHandle:
        """Start a sandbox whose agent listens on the returned ``agent_socket``.

        On failure everything made so far is removed before the error propagates (a BranchboxError).
        """

    def is_alive(self, handle: SandboxHandle) -> bool:
        """True when the sandbox's init process still runs (pid and start time match)."""

    async def wait_exit(self, handle: SandboxHandle) -> None:
        """Return when the sandbox's init has exited (event-driven, no polling)."""

    def foreground(self, handle: SandboxHandle) -> None:
        """Give a sandbox booted with ``background=True`` normal CPU priority (a pool member being claimed)."""

    def set_hostname(self, handle: SandboxHandle, hostname: str) -> None:
        """Change the hostname of a running sandbox (fast: no process, no agent call)."""

    async def pause(self, handle: SandboxHandle) -> None:
        """Freeze every process of the sandbox. Only when ``capabilities.pause``."""

    async def resume(self, handle: SandboxHandle) -> None:
        """Thaw a paused sandbox. Only when ``capabilities.pause``."""

    async def destroy(self, sandbox_id: str, handle: SandboxHandle | None) -> None:
        """Kill every process and remove every cgroup, mount and file the backend made. Idempotent; works for a
        sandbox whose boot failed half-way (``handle`` is then None)."""

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """Remove backend resources (cgroups, processes, run dirs) of sandboxes not in ``keep``; return their ids."""

    async def aclose(self) -> None:
        """Release host-wide resources; running sandboxes are left running."""


@runtime_checkable
class MemorySnapshots(Protocol):
    """What a backend with ``capabilities.memory_snapshot`` adds to :class:`Backend`."""

    async def capture(self, handle: SandboxHandle, dest: Path) -> LayerInfo:
        """Save a *paused* sandbox's memory, devices and disk into the new layer dir ``dest`` (durable on return).
        A BootSpec with ``memory_snapshot=dest`` boots a sandbox that continues from it."""


@runtime_checkable
class HostIdRanges(Protocol):
    """A backend whose sandboxes map to host uid ranges (the container backend): it picks each sandbox's range
    before its directories are made (a range whose spare shell waits ready in the zygote, when there is one)."""

    def choose_idmap(self, sandbox_id: str) -> IdMap:
        """The range sandbox ``sandbox_id`` will boot in (held for it until the Manager releases it)."""
        ...

    def prepare_idmaps(self, src_base: int, count: int) -> asyncio.Task[dict[str, Any]] | None:
        """Start making what the next ``count`` boots need to read layers of range ``src_base`` (a fork's
        children), in the background; None when there is nothing to make."""
        ...
