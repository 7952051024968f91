"""Request and response bodies of the HTTP API (pydantic models; they make the checked-in OpenAPI document).

Field names follow the E2B API where one exists (``sandbox_id``, ``template_id``, ``metadata``,
``started_at``, ``end_at``) so an E2B-compatible facade is a renaming, not a second implementation.
``stdout``/``stderr`` in JSON results are UTF-8 decoded with ``errors="replace"``; use the streaming
WebSocket with ``?encoding=base64`` for exact bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from branchbox import limits as L
from branchbox.core.pool import PoolConfig, PoolStats
from branchbox.models import (
    ArchiveResult,
    FileEntry,
    ProcessInfo,
    SandboxInfo,
    SandboxState,
    SnapshotInfo,
    TemplateInfo,
)

# Every bound below comes from branchbox.limits (core/validate.py enforces the same ones, in bytes, and the
# host-dependent ones: cores and memory of this host, the daemon's max_timeout).
MAX_TIMEOUT_S = L.MAX_TIMEOUT_S
Timeout = Annotated[float | None, Field(gt=0, le=L.MAX_TIMEOUT_S)]
EnvMap = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=L.MAX_ENV_NAME)],
        Annotated[str, Field(max_length=L.MAX_ARG_BYTES)],
    ],
    Field(max_length=L.MAX_ENV_VARS, description=f"At most {L.MAX_ENV_BYTES} bytes in all (NAME=value each)."),
]
MetadataMap = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=L.MAX_METADATA_KEY)],
        Annotated[str, Field(max_length=L.MAX_METADATA_VALUE)],
    ],
    Field(max_length=L.MAX_METADATA, description="Keys: letters, digits and _.:/-."),
]
Path_ = Annotated[
    str, Field(min_length=1, max_length=L.MAX_PATH_BYTES - 1, description="Absolute path inside the sandbox.")
]
Cwd = Annotated[str | None, Field(min_length=1, max_length=L.MAX_PATH_BYTES - 1)]
User = Annotated[str | None, Field(min_length=1, max_length=L.MAX_USER_NAME)]
Tag = Annotated[str | None, Field(max_length=L.MAX_TAG)]
Cmd = (
    Annotated[str, Field(min_length=1, max_length=L.MAX_ARG_BYTES)]
    | Annotated[list[Annotated[str, Field(max_length=L.MAX_ARG_BYTES)]], Field(min_length=1, max_length=L.MAX_ARGV)]
)
Cpu = Annotated[float, Field(ge=L.MIN_CPU, le=L.MAX_CPU, description="Cores (at most this host's).")]
MemoryMb = Annotated[int, Field(ge=L.MIN_MEMORY_MB, le=L.MAX_MEMORY_MB, description="MiB (at most this host's).")]
Pids = Annotated[int, Field(ge=L.MIN_PIDS, le=L.MAX_PIDS)]
DiskMb = Annotated[
    int | None,
    Field(
        ge=L.MIN_DISK_MB,
        le=L.MAX_DISK_MB,
        description="MiB the sandbox's writable layer may hold (writes past it fail with EDQUOT inside); null: the "
        "daemon's default_disk_mb. Needs a btrfs data dir and the container backend.",
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. sandbox_not_found.")
    message: str = Field(description="What went wrong and what to change.")
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


NetEntries = Annotated[list[Annotated[str, Field(min_length=1, max_length=255)]], Field(max_length=1024)]


class NetworkPolicyRequest(_Strict):
    """Egress lists: IPv4 CIDRs (``203.0.113.0/24``, ``1.2.3.4``) and domain names (``pypi.org``,
    ``*.example.com``). ``allow_out`` wins over ``deny_out``; see docs/networking.md."""

    allow_out: NetEntries | None = None
    deny_out: NetEntries | None = None


class NetworkUpdateRequest(NetworkPolicyRequest):
    allow_internet_access: bool | None = None


class NetworkResponse(BaseModel):
    address: str = Field(description="The sandbox's IPv4 address (reachable from the daemon's host only).")
    allow_internet_access: bool
    allow_out: list[str]
    deny_out: list[str]
    port_token: str = Field(description="Per-sandbox token accepted by /ports/ instead of the API key.")


class CreateSandboxRequest(_Strict):
    template: Annotated[str, Field(min_length=1, max_length=255)] = "default"
    timeout: Timeout = Field(
        default=None,
        description="Seconds until the sandbox is destroyed (at most the daemon's max_timeout); null uses the "
        "daemon's default.",
    )
    envs: EnvMap | None = None
    metadata: MetadataMap | None = None
    cpu: Cpu = L.DEFAULT_CPU
    memory_mb: MemoryMb = L.DEFAULT_MEMORY_MB
    pids: Pids = L.DEFAULT_PIDS
    disk_mb: DiskMb = None
    backend: Annotated[str | None, Field(max_length=64)] = None
    hostname: Annotated[str | None, Field(min_length=1, max_length=L.MAX_HOSTNAME)] = None
    snapshot: Annotated[str | None, Field(min_length=1, max_length=255)] = Field(
        default=None, description="Restore this snapshot (id or name); its template is used, not `template`."
    )
    allow_internet_access: bool | None = Field(
        default=None, description="Egress to the public internet (default true); false: no egress at all."
    )
    network: NetworkPolicyRequest | None = None
    on_timeout: Literal["destroy", "pause"] = Field(
        default="destroy",
        description="What reaching the timeout does: destroy the sandbox, or pause it (kept until resumed or "
        "destroyed; a resume starts its timeout again).",
    )
    auto_resume: bool = Field(
        default=False,
        description="With on_timeout=pause: the next call that needs the sandbox running (a command, a file, a "
        "terminal, its ports) resumes it first.",
    )


class SandboxResponse(BaseModel):
    sandbox_id: str
    template_id: str
    template_digest: str
    backend: str
    state: SandboxState
    metadata: dict[str, str]
    hostname: str
    started_at: datetime
    end_at: datetime | None = Field(description="When the sandbox times out; null means never.")
    cpu: float
    memory_mb: int
    pids: int
    disk_mb: int = Field(description="MiB its writable layer may hold; 0: no limit.")
    source: str = Field(description="cold, warm, snapshot (a restore) or fork.")
    timings: dict[str, float] = Field(description="Per-phase duration of the create, in milliseconds.")
    error: str | None = None
    on_timeout: str = Field(default="destroy", description="destroy or pause: what reaching end_at does.")
    auto_resume: bool = Field(default=False, description="Paused, it is resumed by the next call that needs it.")

    @classmethod
    def of(cls, info: SandboxInfo) -> SandboxResponse:
        return cls(
            sandbox_id=info.id,
            template_id=info.template,
            template_digest=info.template_digest,
            backend=info.backend,
            state=info.state,
            metadata=dict(info.metadata),
            hostname=info.hostname,
            started_at=datetime.fromtimestamp(info.created_at, UTC),
            end_at=None if info.expires_at is None else datetime.fromtimestamp(info.expires_at, UTC),
            cpu=info.resources.cpu,
            memory_mb=info.resources.memory_mb,
            pids=info.resources.pids,
            disk_mb=info.resources.disk_mb,
            source=info.source,
            timings=dict(info.timings),
            error=info.error,
            on_timeout=info.lifecycle.on_timeout,
            auto_resume=info.lifecycle.auto_resume,
        )


class TimeoutRequest(_Strict):
    timeout: Timeout = Field(description="Seconds from now until the sandbox is destroyed; null removes the timeout.")


class RunCommandRequest(_Strict):
    cmd: Cmd = Field(
        description=f"A string runs under /bin/sh -c; a list is an argv (at most {L.MAX_CMD_BYTES} bytes in all)."
    )
    envs: EnvMap | None = None
    cwd: Cwd = None
    user: User = None
    stdin: Annotated[str | None, Field(max_length=L.MAX_STDIN_BYTES)] = Field(
        default=None, description="Text written to the command's stdin, then closed."
    )
    timeout: Timeout = None
    background: bool = Field(default=False, description="Return at once with the pid instead of waiting.")
    tag: Tag = None
    max_output: Annotated[int | None, Field(ge=0)] = Field(
        default=None,
        description="Keep at most this many bytes of each output stream (never more than the daemon's "
        "max_output_mb, 64 MiB by default); the command still runs to its exit, the rest is dropped.",
    )


class CommandResult(BaseModel):
    exit_code: int
    stdout: str = Field(description="UTF-8 decoded with errors='replace'.")
    stderr: str = Field(description="UTF-8 decoded with errors='replace'.")
    signal: int | None = None
    duration_ms: float
    stdout_truncated: bool = Field(
        default=False,
        description="The command printed more than the output limit on stdout: `stdout` holds the first "
        "bytes, the rest was dropped (the command still ran to its exit). Stream the output (commands/stream) "
        "or redirect it to a file to get all of it.",
    )
    stderr_truncated: bool = Field(default=False, description="As `stdout_truncated`, for stderr.")


class BackgroundCommand(BaseModel):
    pid: int
    background: Literal[True] = True


class ProcessResponse(BaseModel):
    pid: int
    cmd: list[str]
    tag: str | None
    running: bool
    exit_code: int | None
    pty: bool

    @classmethod
    def of(cls, p: ProcessInfo) -> ProcessResponse:
        return cls(pid=p.pid, cmd=list(p.cmd), tag=p.tag, running=p.running, exit_code=p.exit_code, pty=p.pty)


class KillRequest(_Strict):
    signal: Annotated[int, Field(ge=1, le=64)] = 9


class FileEntryResponse(BaseModel):
    path: str
    name: str
    type: str = Field(description="file, dir, symlink or other.")
    size: int
    mode: int
    mtime: float = Field(description="Seconds since the epoch.")
    symlink_target: str | None = None

    @classmethod
    def of(cls, e: FileEntry) -> FileEntryResponse:
        return cls(
            path=e.path,
            name=e.name,
            type=e.type,
            size=e.size,
            mode=e.mode,
            mtime=e.mtime,
            symlink_target=e.symlink_target,
        )


class ArchiveResponse(BaseModel):
    """What an uploaded tar made in the sandbox."""

    path: str = Field(description="The directory it was unpacked into.")
    files: int = Field(description="Regular files written.")
    dirs: int = Field(description="Directories made.")
    links: int = Field(description="Symlinks and hard links made.")
    bytes: int = Field(description="Bytes of the regular files.")

    @classmethod
    def of(cls, r: ArchiveResult) -> ArchiveResponse:
        return cls(path=r.path, files=r.files, dirs=r.dirs, links=r.links, bytes=r.bytes)


class PathRequest(_Strict):
    path: Path_


class RenameRequest(_Strict):
    src: Path_
    dst: Path_


class TemplateResponse(BaseModel):
    name: str
    digest: str
    created_at: datetime
    size_bytes: int
    source: str
    workdir: str

    @classmethod
    def of(cls, t: TemplateInfo) -> TemplateResponse:
        return cls(
            name=t.name,
            digest=t.digest,
            created_at=datetime.fromtimestamp(t.created_at, UTC),
            size_bytes=t.size_bytes,
            source=t.source,
            workdir=t.workdir,
        )


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        default="ok", description="degraded: the daemon answers but refuses some work; reasons say why."
    )
    reasons: list[str] | None = Field(default=None, description="When degraded: what is, and what to do about it.")


class VersionResponse(BaseModel):
    version: str
    api: Literal["v1"] = "v1"


class StreamStart(_Strict):
    """First WebSocket message on ``commands/stream``."""

    cmd: Cmd
    envs: EnvMap | None = None
    cwd: Cwd = None
    user: User = None
    timeout: Timeout = None
    tag: Tag = None
    stdin: bool = Field(default=False, description="Keep stdin open for 'stdin' messages.")
    kill_on_disconnect: bool = False


class PtyStart(_Strict):
    """First WebSocket message on ``pty``."""

    cols: Annotated[int, Field(ge=1, le=10_000)] = 80
    rows: Annotated[int, Field(ge=1, le=10_000)] = 24
    cmd: Cmd | None = Field(default=None, description="Default: /bin/bash -l, or /bin/sh -l in an image without bash.")
    envs: EnvMap | None = None
    cwd: Cwd = None
    user: User = None
    timeout: Timeout = None
    tag: Tag = None
    kill_on_disconnect: bool = True


class ClientFrame(_Strict):
    """Messages a client sends after the start: stdin, close_stdin, resize, kill."""

    type: Literal["stdin", "close_stdin", "resize", "kill"]
    data: str | None = None
    cols: Annotated[int | None, Field(ge=1, le=10_000)] = None
    rows: Annotated[int | None, Field(ge=1, le=10_000)] = None
    signal: Annotated[int | None, Field(ge=1, le=64)] = None


class PoolSettings(_Strict):
    """The settings of one warm pool (``[pools.<template>]`` in the daemon's config, without the template)."""

    min_size: Annotated[int, Field(ge=0, le=1024, description="Members kept at all times.")] = 0
    max_size: Annotated[int, Field(ge=0, le=1024, description="Never more members (ready + booting).")] = 8
    target_free: Annotated[int, Field(ge=0, le=1024, description="Ready members the replenisher keeps.")] = 2
    max_memory_mb: Annotated[int | None, Field(ge=0, description="Memory budget of idle members; null: none.")] = None
    max_parallel_boots: Annotated[int, Field(ge=1, le=1024)] = 2
    reuse: bool = Field(default=False, description="Reset released sandboxes into the pool (golden reset).")
    cpu: Cpu = L.DEFAULT_CPU
    memory_mb: MemoryMb = L.DEFAULT_MEMORY_MB
    pids: Pids = L.DEFAULT_PIDS

    @classmethod
    def of(cls, c: PoolConfig) -> PoolSettings:
        fields = c.as_dict()
        del fields["template"], fields["backend"]
        return cls(**fields)

    def config(self, template: str, backend: str | None = None) -> PoolConfig:
        return PoolConfig(template=template, backend=backend, **self.model_dump())


class PoolResponse(BaseModel):
    """Statistics of one warm pool. A create with the pool's cpu/memory_mb/pids is served from it."""

    template: str
    backend: str = Field(description="What the members run on: creates of this template on it are served here.")
    ready: int = Field(description="Members booted and waiting to be claimed.")
    booting: int
    claimed: int = Field(description="Sandboxes claimed from this pool that are still alive.")
    hits: int = Field(description="Creates served warm.")
    misses: int = Field(description="Creates that found the pool empty and booted cold.")
    boots: int
    boot_failures: int
    replaced: int = Field(description="Members that died and were replaced.")
    recycled: int = Field(description="Released sandboxes reset into the pool (reuse).")
    claim_p50_ms: float | None
    claim_p99_ms: float | None
    target: int = Field(description="Members (ready + booting) the replenisher aims for.")
    config: PoolSettings

    @classmethod
    def of(cls, s: PoolStats) -> PoolResponse:
        return cls(
            template=s.template,
            backend=s.backend,
            ready=s.ready,
            booting=s.booting,
            claimed=s.claimed,
            hits=s.hits,
            misses=s.misses,
            boots=s.boots,
            boot_failures=s.boot_failures,
            replaced=s.replaced,
            recycled=s.recycled,
            claim_p50_ms=s.claim_p50_ms,
            claim_p99_ms=s.claim_p99_ms,
            target=s.config.target,
            config=PoolSettings.of(s.config),
        )


class CreateSnapshotRequest(_Strict):
    name: Annotated[str | None, Field(min_length=1, max_length=128)] = Field(
        default=None, description="Unique name (letters, digits, _ . : -); null: unnamed."
    )


class SnapshotResponse(BaseModel):
    """An immutable capture of a sandbox's files (container backend: no processes)."""

    snapshot_id: str
    name: str | None
    sandbox_id: str | None = Field(description="The sandbox it was taken from (it may be gone since).")
    template_id: str
    template_digest: str
    created_at: datetime
    layers: list[str] = Field(description="Layer ids, topmost first; the template is below the last.")
    driver: str = Field(description="Storage driver: overlay or btrfs.")
    size_bytes: int | None = Field(description="Disk used by the snapshot's own layer; null until measured.")
    files: int | None
    timings: dict[str, float] = Field(description="freeze, capture, thaw, store, total (ms).")

    @classmethod
    def of(cls, s: SnapshotInfo) -> SnapshotResponse:
        return cls(
            snapshot_id=s.id,
            name=s.name,
            sandbox_id=s.sandbox_id,
            template_id=s.template,
            template_digest=s.template_digest,
            created_at=datetime.fromtimestamp(s.created_at, UTC),
            layers=list(s.layers),
            driver=s.driver,
            size_bytes=s.size_bytes,
            files=s.files,
            timings=dict(s.timings),
        )


class ForkRequest(_Strict):
    count: int = Field(default=1, description="Number of children (1..64).")


class ForkResult(BaseModel):
    """One child of a fork: its sandbox, or the error it met (one failure does not hide the others)."""

    sandbox: SandboxResponse | None = None
    error: ErrorBody | None = None


class ForkResponse(BaseModel):
    results: list[ForkResult]


class ResetRequest(_Strict):
    snapshot: Annotated[str | None, Field(min_length=1, max_length=255)] = Field(
        default=None, description="Snapshot id or name to reset to; null: the sandbox's template."
    )
