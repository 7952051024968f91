"""The node side of a fleet: ``branchbox serve --fleet ADDRESS`` joins its daemon to a Ray cluster.

:func:`join` connects the daemon process to Ray as a driver and starts this daemon's **node agent**: a detached,
named Ray actor (``branchbox-node-<name>`` in namespace ``branchbox``) pinned to the daemon's Ray node
(``NodeAffinitySchedulingStrategy(soft=False)``, ``num_cpus=0``, so it takes no CPU slot from Ray's own work).
Every ``interval`` seconds the agent reads its daemon over loopback HTTP (templates, warm pools, sandboxes) and
pushes the capacity to the controller's inbox (a named actor). A push is also the node's heartbeat: a node whose
daemon stops answering stops pushing and is lost by the controller's timeout, a node whose Ray node dies is lost
by Ray's health checks. Each agent start is an *incarnation* (a random id): the controller takes a new one as a
rejoin and reconciles the node's sandboxes.

Capacity comes from figures the node is given (``memory_mb``, ``cpu``: what sandboxes may take on this host)
minus what its sandboxes hold, not from Ray's view of the host (co-located Ray nodes each report the whole host).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from branchbox.sdk._awire import AsyncWire

NAMESPACE = "branchbox"
INBOX = "branchbox-fleet-inbox"
AGENT_PREFIX = "branchbox-node-"


@dataclass(frozen=True, slots=True)
class JoinSettings:
    """How a daemon joins a fleet (``branchbox serve --fleet``; env ``BRANCHBOX_FLEET_*``)."""

    address: str
    """The Ray cluster: ``HOST:PORT`` of its GCS (``ray start --head`` prints it), or ``auto``."""
    name: str = ""
    """This node's name in the fleet, stable across restarts (default ``<hostname>:<port>``)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Placement labels (a create may ask for ``region=eu``...); ``backend`` labels are added."""
    memory_mb: int = 0
    """Memory sandboxes may take on this node (default: the host's MemTotal less 1 GiB)."""
    cpu: float = 0.0
    """The sum of the sandboxes' CPU limits this node takes (default: 16 per host CPU: a sandbox's ``cpu`` is a
    quota, not a reserved core, so a host is overcommitted like any container host)."""
    backends: tuple[str, ...] = ("container",)
    ray_node_id: str = ""
    """The Ray node to pin the agent to (default: the node this process's Ray driver is on; set it when several
    Ray nodes share a host, as in tests)."""
    interval: float = 0.5
    """Seconds between pushes (the controller loses a node after ``stale_after`` without one)."""
    daemon_timeout: float = 5.0
    """The agent stops pushing when its daemon has not answered for this long (a hung daemon is lost then)."""
    api_key: str = ""
    """A key the agent sends to its own daemon, when the daemon requires one."""
    url: str = ""
    """The URL the controller calls this daemon at (default ``http://BIND_HOST:PORT``, the FQDN when bound to
    0.0.0.0)."""

    @classmethod
    def from_env(
        cls,
        address: str | None,
        env: Mapping[str, str] | None = None,
        *,
        table: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> JoinSettings:
        """Flags (``address``, the ``--fleet`` flag, and ``overrides``) > ``BRANCHBOX_FLEET_*`` (``ADDRESS``,
        ``NAME``, ``LABELS`` as ``k=v,k=v``, ``MEMORY_MB``, ``CPU``, ``BACKENDS``, ``RAY_NODE_ID``, ``INTERVAL``,
        ``API_KEY``, ``URL``) > the config file's ``[fleet]`` table (``table``: the same names in lower case;
        ``labels`` a table or ``"k=v,k=v"``, ``backends`` a list) > defaults. Raises BadRequestError naming the
        setting and where it came from."""
        from branchbox.errors import BadRequestError  # noqa: PLC0415 - keeps this module's import light

        env = os.environ if env is None else env
        kw: dict[str, Any] = {"address": ""}
        unknown = sorted(set(table or {}) - set(_SETTINGS))
        if unknown:
            raise BadRequestError(
                f"unknown setting(s) {', '.join(unknown)} in the config file's [fleet] table; known: "
                + ", ".join(sorted(_SETTINGS))
            )
        sources = [(k, v, f"[fleet] {k}") for k, v in (table or {}).items()]
        sources += [(k, env[v], f"${v}") for k, v in _SETTINGS.items() if env.get(v)]
        for key, value, source in sources:
            try:
                kw[key] = _setting(key, value)
            except (TypeError, ValueError, BadRequestError) as exc:
                why = exc.message if isinstance(exc, BadRequestError) else str(exc)
                raise BadRequestError(f"invalid fleet setting {key}={value!r} from {source}: {why}") from None
        if address:
            kw["address"] = address
        kw.update({k: v for k, v in overrides.items() if v})
        return cls(**kw)


# the settings a [fleet] table may hold, and their environment variables
_SETTINGS = {
    name: f"BRANCHBOX_FLEET_{name.upper()}"
    for name in (
        "address", "name", "labels", "memory_mb", "cpu", "backends", "ray_node_id", "interval", "api_key", "url",
    )
}  # fmt: skip


def _setting(key: str, value: Any) -> Any:
    """One fleet setting from TOML (typed) or the environment (text)."""
    if key == "labels":
        if isinstance(value, Mapping):
            return {str(k): str(v) for k, v in value.items()}
        return parse_labels(value if isinstance(value, str) else [str(v) for v in value])
    if key == "backends":
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(b).strip() for b in items if str(b).strip())
    if isinstance(value, bool | Mapping | list):
        raise TypeError(f"expected {'a number' if key in ('memory_mb', 'cpu', 'interval') else 'text'}")
    if key == "memory_mb":
        mb = int(value)
        if mb < 0:
            raise ValueError("must be >= 0 (0: the host's memory less 1 GiB)")
        return mb
    if key in ("cpu", "interval"):
        got = float(value)
        if got <= 0 if key == "interval" else got < 0:
            raise ValueError("must be positive")
        return got
    return str(value)


def parse_labels(text: str | Sequence[str]) -> dict[str, str]:
    """``region=eu,kvm=1`` (or a list of ``k=v``) -> a dict; a pair without ``=`` is an error."""
    from branchbox.errors import BadRequestError  # noqa: PLC0415 - keeps this module's import light

    parts = text.split(",") if isinstance(text, str) else list(text)
    out: dict[str, str] = {}
    for part in (p.strip() for p in parts):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise BadRequestError(f"label {part!r} is not KEY=VALUE (e.g. region=eu)")
        out[key.strip()] = value.strip()
    return out


CPU_OVERCOMMIT = 16


def host_budget() -> tuple[int, int]:
    """(memory MiB, CPU millicores) of this host for sandboxes: MemTotal less 1 GiB; 16 CPU limits per CPU."""
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    return max(0, mem_kb // 1024 - 1024), (os.cpu_count() or 1) * 1000 * CPU_OVERCOMMIT


def capacity_of(
    templates: Sequence[Mapping[str, Any]],
    pools: Sequence[Mapping[str, Any]],
    sandboxes: Sequence[Mapping[str, Any]],
    *,
    memory_mb: int,
    cpu_millis: int,
    backends: Sequence[str],
) -> dict[str, Any]:
    """A node's push from its daemon's answers (GET /v1/templates, /v1/pools, /v1/sandboxes): plain data, as
    it crosses Ray. Sandboxes in any state but ``error`` hold their memory and CPU."""
    live = [s for s in sandboxes if s.get("state") != "error"]
    used_mem = sum(int(s.get("memory_mb", 0)) for s in live)
    used_cpu = sum(round(float(s.get("cpu", 0)) * 1000) for s in live)
    held = sorted({(t["name"], b) for t in templates for b in backends})
    warm = sorted((p["template"], p["backend"], int(p["ready"])) for p in pools if int(p.get("ready", 0)) > 0)
    return {
        "memory_mb": max(0, memory_mb - used_mem),
        "cpu_millis": max(0, cpu_millis - used_cpu),
        "running": len(live),
        "templates": [list(k) for k in held],
        "warm": [list(w) for w in warm],
    }


class NodeAgent:
    """The Ray actor (made with ``ray.remote`` in :func:`join`). Runs in a Ray worker on the daemon's node."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.incarnation = secrets.token_hex(8)
        self.seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: Any = None
        self.capacity: dict[str, Any] | None = None
        self.read_at = 0.0
        self.last_error = ""

    async def start(self) -> str:
        """Start reading the daemon and pushing; returns the Ray node id this agent runs on."""
        import ray  # noqa: PLC0415 - runs inside a Ray worker

        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._push_loop())]
        return str(ray.get_runtime_context().get_node_id())

    async def status(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "seq": self.seq, "last_error": self.last_error}

    async def leave(self) -> None:
        """A graceful leave: the controller drops the node at once instead of waiting for its timeout."""
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._push({"leave": True})

    async def _push(self, extra: dict[str, Any]) -> None:
        import ray  # noqa: PLC0415

        if self._inbox is None:
            self._inbox = ray.get_actor(INBOX, namespace=NAMESPACE)
        self.seq += 1
        msg = {
            "node": self.info["name"],
            "url": self.info["url"],
            "labels": self.info["labels"],
            "ray_node_id": self.info["ray_node_id"],
            "incarnation": self.incarnation,
            "seq": self.seq,
            **extra,
        }
        await self._inbox.push.remote(msg)

    async def _push_loop(self) -> None:
        """The heartbeat: the latest capacity every ``interval``, as long as the daemon answered within
        ``daemon_timeout`` (a slow answer does not delay the beat; a daemon that stopped answering stops it)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.capacity is not None and loop.time() - self.read_at < self.info["daemon_timeout"]:
                try:
                    await self._push({"capacity": self.capacity})
                except Exception as exc:
                    self.last_error = f"push: {type(exc).__name__}: {exc}"
                    self._inbox = None
            await asyncio.sleep(self.info["interval"])

    async def _read_loop(self) -> None:
        from branchbox.sdk._awire import AsyncWire  # noqa: PLC0415 - in the Ray actor's process only
        from branchbox.sdk._config import ConnectionConfig  # noqa: PLC0415

        info = self.info
        loop = asyncio.get_running_loop()
        wire = AsyncWire(ConnectionConfig(base_url=info["url"], api_key=info.get("api_key"), request_timeout=5.0))
        try:
            while True:
                try:
                    answers = await _daemon_state(wire)
                    self.capacity = capacity_of(
                        *answers,
                        memory_mb=info["memory_mb"],
                        cpu_millis=info["cpu_millis"],
                        backends=info["backends"],
                    )
                    self.read_at = loop.time()
                except Exception as exc:
                    self.last_error = f"daemon: {type(exc).__name__}: {exc}"
                await asyncio.sleep(info["interval"])
        finally:
            wire.close()


async def _daemon_state(wire: AsyncWire) -> list[Any]:
    """The daemon's templates, pools and sandboxes; raises when one of them is not answered 200."""
    paths = ("/v1/templates", "/v1/pools", "/v1/sandboxes")
    answers = await asyncio.gather(*(wire.request("GET", path, None, 5.0) for path in paths))
    bad = [f"GET {p} answered {r.status_code}" for p, r in zip(paths, answers, strict=True) if r.status_code != 200]
    if bad:
        raise RuntimeError("; ".join(bad))
    return [r.json() for r in answers]


@dataclass
class Membership:
    """What :func:`join` made: ``leave()`` stops the agent and disconnects from Ray."""

    name: str
    ray_node_id: str
    agent: Any
    leave: Callable[[], None]


def default_name(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


def join(settings: JoinSettings, daemon_url: str, port: int) -> Membership:
    """Connect to Ray and start (or replace) this daemon's node agent. Blocking (~1-2 s): call it off the event
    loop. Raises the Ray error when the cluster cannot be reached."""
    import ray  # noqa: PLC0415 - the fleet extra
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    if not ray.is_initialized():
        ray.init(
            address=settings.address,
            namespace=NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
            include_dashboard=False,
        )
    name = settings.name or default_name(port)
    ray_node_id = settings.ray_node_id or ray.get_runtime_context().get_node_id()
    mem, cpu = host_budget()
    labels = {**settings.labels, **{f"backend.{b}": "1" for b in settings.backends}}
    info = {
        "name": name,
        "url": daemon_url,
        "labels": labels,
        "memory_mb": settings.memory_mb or mem,
        "cpu_millis": round(settings.cpu * 1000) if settings.cpu else cpu,
        "backends": list(settings.backends),
        "ray_node_id": ray_node_id,
        "interval": settings.interval,
        "daemon_timeout": settings.daemon_timeout,
        "api_key": settings.api_key,
    }
    actor_name = AGENT_PREFIX + name
    with contextlib.suppress(ValueError):  # a previous incarnation (a restart of this daemon): replace it
        ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
    options = ray.remote(NodeAgent).options(
        name=actor_name,
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ray_node_id, soft=False),
    )
    for attempt in range(100):  # the killed incarnation's name is freed asynchronously
        try:
            agent: Any = options.remote(info)
            break
        except ValueError:
            if attempt == 99:
                raise
            time.sleep(0.1)
    ray.get(agent.start.remote(), timeout=120)

    def leave() -> None:
        with contextlib.suppress(Exception):
            ray.get(agent.leave.remote(), timeout=5)
        with contextlib.suppress(Exception):
            ray.kill(agent, no_restart=True)
        with contextlib.suppress(Exception):
            ray.shutdown()

    return Membership(name, ray_node_id, agent, leave)
