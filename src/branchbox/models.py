"""Plain data shared by the core, the backends and the transports. No I/O here."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from branchbox.limits import DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_PIDS


class SandboxState(enum.StrEnum):
    """Lifecycle: ``creating -> running <-> paused -> stopped -> destroyed``, plus ``error``."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DESTROYED = "destroyed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Resources:
    """Limits applied to one sandbox. ``cpu`` is in cores (fractions allowed)."""

    cpu: float = DEFAULT_CPU
    memory_mb: int = DEFAULT_MEMORY_MB
    pids: int = DEFAULT_PIDS
    disk_mb: int = 0  # MiB its writable layer may hold; 0: no limit


ON_TIMEOUT = ("destroy", "pause")


@dataclass(frozen=True, slots=True)
class TimeoutPolicy:
    """What reaching a sandbox's time to live does: ``destroy`` it (the default) or ``pause`` it (kept until it is
    resumed or destroyed). ``auto_resume``: a paused sandbox is resumed by the next request that reaches it (the
    E2B facade's data plane). ``timeout``: the time to live it was created with, started again on each resume of a
    sandbox its timeout paused (as E2B's auto-resume does)."""

    on_timeout: str = "destroy"
    auto_resume: bool = False
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    id: str
    template: str
    template_digest: str
    backend: str
    state: SandboxState
    created_at: float  # wall clock, seconds since the epoch (for display and the API only)
    expires_at: float | None  # wall clock; None means no TTL
    resources: Resources
    metadata: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    hostname: str = ""
    source: str = "cold"  # cold | warm | snapshot
    timings: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    lifecycle: TimeoutPolicy = TimeoutPolicy()


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None  # set when the process was killed by a signal (exit_code is then 128 + signal)
    duration_ms: float = 0.0
    stdout_truncated: bool = False  # the process printed more than the call's output limit: the rest was dropped
    stderr_truncated: bool = False

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    cmd: list[str]
    tag: str | None
    running: bool
    exit_code: int | None
    pty: bool = False


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    name: str
    type: str  # file | dir | symlink | other
    size: int
    mode: int
    mtime: float
    symlink_target: str | None = None
    uid: int = 0
    gid: int = 0
    owner: str = ""  # the owner's user name in the sandbox (its uid as digits when it has none)
    group: str = ""
    xattrs: Mapping[str, str] = field(default_factory=dict)  # extended attributes, when the call asked for them


@dataclass(frozen=True, slots=True)
class FileEvent:
    """A change in a watched sandbox directory (``Manager.watch_dir``)."""

    type: str  # create | write | remove | rename (the old name; the new one is a create) | chmod | overflow
    name: str  # relative to the watched directory ("" for an overflow: events were lost)
    is_dir: bool = False
    reason: str = ""  # an overflow's: queue (the kernel's event queue overflowed) | watch_limit


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    """What unpacking a tar into a sandbox directory made."""

    path: str
    files: int
    dirs: int
    links: int  # symlinks and hard links
    bytes: int  # of regular files


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    name: str
    digest: str
    created_at: float
    size_bytes: int
    python: str | None = None  # the image's python3 (informational: the agent brings its own runtime)
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    source: str = "spec"  # spec | import | image | dockerfile
    user: str = "root"  # default user of commands (an image's USER; a spec's user)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """An immutable capture of a sandbox's filesystem (container backend: files only, no processes)."""

    id: str
    name: str | None
    sandbox_id: str | None  # the sandbox it was taken from (it may be gone since)
    template: str
    template_digest: str
    created_at: float  # wall clock, seconds since the epoch
    layers: tuple[str, ...]  # layer ids, topmost first (the template is below the last one)
    driver: str  # storage driver: overlay | btrfs
    size_bytes: int | None = None  # disk used by the snapshot's own layer; None until measured (off the hot path)
    files: int | None = None  # entries in that layer
    timings: Mapping[str, float] = field(default_factory=dict)
