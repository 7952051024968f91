"""Plain data the SDK returns (its own copies: the SDK imports nothing of the daemon)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _dt(value: Any) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    sandbox_id: str
    template_id: str
    state: str
    metadata: dict[str, str]
    started_at: datetime
    end_at: datetime | None
    backend: str = ""
    hostname: str = ""
    source: str = ""
    cpu: float = 0.0
    memory_mb: int = 0
    pids: int = 0
    disk_mb: int = 0  # MiB its writable layer may hold; 0: no limit
    template_digest: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    on_timeout: str = "destroy"  # or "pause": what reaching end_at does
    auto_resume: bool = False  # paused, it is resumed by the next call that needs it running

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SandboxInfo:
        started = _dt(d["started_at"])
        assert started is not None
        return cls(
            sandbox_id=d["sandbox_id"],
            template_id=d["template_id"],
            state=d["state"],
            metadata=dict(d.get("metadata") or {}),
            started_at=started,
            end_at=_dt(d.get("end_at")),
            backend=d.get("backend", ""),
            hostname=d.get("hostname", ""),
            source=d.get("source", ""),
            cpu=float(d.get("cpu", 0.0)),
            memory_mb=int(d.get("memory_mb", 0)),
            pids=int(d.get("pids", 0)),
            disk_mb=int(d.get("disk_mb", 0)),
            template_digest=d.get("template_digest", ""),
            timings={k: float(v) for k, v in (d.get("timings") or {}).items()},
            error=d.get("error"),
            on_timeout=d.get("on_timeout", "destroy"),
            auto_resume=bool(d.get("auto_resume", False)),
        )


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command. A non-zero ``exit_code`` is a result, not an exception."""

    exit_code: int
    stdout: str
    stderr: str
    signal: int | None = None
    duration_ms: float = 0.0
    stdout_truncated: bool = False  # more was printed than the output limit: ``stdout`` holds the first bytes
    stderr_truncated: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommandResult:
        return cls(
            exit_code=int(d["exit_code"]),
            stdout=d.get("stdout", ""),
            stderr=d.get("stderr", ""),
            signal=d.get("signal"),
            duration_ms=float(d.get("duration_ms", 0.0)),
            stdout_truncated=bool(d.get("stdout_truncated", False)),
            stderr_truncated=bool(d.get("stderr_truncated", False)),
        )


MAX_READ_BYTES = 64 << 20  # files.read refuses a larger file (download streams it)
MAX_OUTPUT_CHARS = 64 << 20  # a streamed run's result keeps at most this much of each stream (as the daemon's run)


class OutputCollector:
    """What a streamed run keeps for its :class:`CommandResult`: at most ``limit`` characters of each stream (the
    callbacks still get everything), with ``stdout_truncated`` / ``stderr_truncated`` set when more came."""

    __slots__ = ("limit", "parts", "sizes", "truncated")

    def __init__(self, limit: int = MAX_OUTPUT_CHARS) -> None:
        self.limit = limit
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}

    def add(self, stream: str, text: str) -> None:
        room = self.limit - self.sizes[stream]
        if len(text) > room:
            text = text[: max(room, 0)]
            self.truncated[stream] = True
        if text:
            self.parts[stream].append(text)
            self.sizes[stream] += len(text)

    def result(self, exit_code: int, signal: int | None, duration_ms: float) -> CommandResult:
        return CommandResult(
            exit_code=exit_code,
            stdout="".join(self.parts["stdout"]),
            stderr="".join(self.parts["stderr"]),
            signal=signal,
            duration_ms=duration_ms,
            stdout_truncated=self.truncated["stdout"],
            stderr_truncated=self.truncated["stderr"],
        )


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    cmd: list[str]
    tag: str | None
    running: bool
    exit_code: int | None
    pty: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessInfo:
        return cls(
            pid=int(d["pid"]),
            cmd=list(d.get("cmd") or []),
            tag=d.get("tag"),
            running=bool(d.get("running")),
            exit_code=d.get("exit_code"),
            pty=bool(d.get("pty", False)),
        )


@dataclass(frozen=True, slots=True)
class EntryInfo:
    path: str
    name: str
    type: str  # file | dir | symlink | other
    size: int
    mode: int
    mtime: float
    symlink_target: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EntryInfo:
        return cls(
            path=d["path"],
            name=d["name"],
            type=d["type"],
            size=int(d["size"]),
            mode=int(d["mode"]),
            mtime=float(d["mtime"]),
            symlink_target=d.get("symlink_target"),
        )


@dataclass(frozen=True, slots=True)
class FilesystemEvent:
    """A change in a watched sandbox directory (``sbx.files.watch_dir``)."""

    type: str  # create | write | remove | rename (the old name; the new one is a create) | chmod | overflow
    name: str  # relative to the watched directory ("" for an overflow: events were lost)
    is_dir: bool = False
    reason: str = ""  # an overflow's: queue (the kernel's event queue overflowed) | watch_limit


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    """What a tar unpacked into a sandbox directory made."""

    path: str
    files: int
    dirs: int
    links: int
    bytes: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArchiveInfo:
        return cls(
            path=d["path"], files=int(d["files"]), dirs=int(d["dirs"]), links=int(d["links"]), bytes=int(d["bytes"])
        )


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    name: str
    digest: str
    created_at: datetime
    size_bytes: int
    source: str = ""
    workdir: str = "/"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TemplateInfo:
        created = _dt(d["created_at"])
        assert created is not None
        return cls(
            name=d["name"],
            digest=d["digest"],
            created_at=created,
            size_bytes=int(d["size_bytes"]),
            source=d.get("source", ""),
            workdir=d.get("workdir", "/"),
        )


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The settings of a warm pool (see ``Sandbox.configure_pool``)."""

    min_size: int = 0
    max_size: int = 8
    target_free: int = 2
    max_memory_mb: int | None = None
    max_parallel_boots: int = 2
    reuse: bool = False
    cpu: float = 1.0
    memory_mb: int = 512
    pids: int = 1024

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PoolSettings:
        mem = d.get("max_memory_mb")
        return cls(
            min_size=int(d.get("min_size", 0)),
            max_size=int(d.get("max_size", 8)),
            target_free=int(d.get("target_free", 2)),
            max_memory_mb=None if mem is None else int(mem),
            max_parallel_boots=int(d.get("max_parallel_boots", 2)),
            reuse=bool(d.get("reuse", False)),
            cpu=float(d.get("cpu", 1.0)),
            memory_mb=int(d.get("memory_mb", 512)),
            pids=int(d.get("pids", 1024)),
        )


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """Statistics of one warm pool at the time of the call."""

    template: str
    ready: int
    booting: int
    claimed: int
    hits: int
    misses: int
    target: int
    settings: PoolSettings
    backend: str = ""  # what its members run on (daemons before pools per backend do not say)
    boots: int = 0
    boot_failures: int = 0
    replaced: int = 0
    recycled: int = 0
    claim_p50_ms: float | None = None
    claim_p99_ms: float | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PoolInfo:
        def opt(key: str) -> float | None:
            v = d.get(key)
            return None if v is None else float(v)

        return cls(
            template=d["template"],
            ready=int(d["ready"]),
            booting=int(d["booting"]),
            claimed=int(d["claimed"]),
            hits=int(d["hits"]),
            misses=int(d["misses"]),
            target=int(d.get("target", 0)),
            settings=PoolSettings.from_json(d.get("config") or {}),
            backend=str(d.get("backend") or ""),
            boots=int(d.get("boots", 0)),
            boot_failures=int(d.get("boot_failures", 0)),
            replaced=int(d.get("replaced", 0)),
            recycled=int(d.get("recycled", 0)),
            claim_p50_ms=opt("claim_p50_ms"),
            claim_p99_ms=opt("claim_p99_ms"),
        )


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """An immutable capture of a sandbox's files; restore it with ``Sandbox.create(snapshot=...)``."""

    snapshot_id: str
    name: str | None
    sandbox_id: str | None
    template_id: str
    created_at: datetime
    layers: list[str] = field(default_factory=list)
    driver: str = ""
    size_bytes: int | None = None
    files: int | None = None
    template_digest: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotInfo:
        created = _dt(d["created_at"])
        assert created is not None
        return cls(
            snapshot_id=d["snapshot_id"],
            name=d.get("name"),
            sandbox_id=d.get("sandbox_id"),
            template_id=d.get("template_id", ""),
            created_at=created,
            layers=list(d.get("layers") or []),
            driver=d.get("driver", ""),
            size_bytes=d.get("size_bytes"),
            files=d.get("files"),
            template_digest=d.get("template_digest", ""),
            timings={k: float(v) for k, v in (d.get("timings") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """A sandbox's address and egress policy (``GET /v1/sandboxes/{id}/network``)."""

    address: str
    allow_internet_access: bool
    allow_out: list[str]
    deny_out: list[str]
    port_token: str = ""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NetworkInfo:
        return cls(
            address=d["address"],
            allow_internet_access=bool(d["allow_internet_access"]),
            allow_out=list(d.get("allow_out") or []),
            deny_out=list(d.get("deny_out") or []),
            port_token=d.get("port_token", ""),
        )
