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
    template_digest: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

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
            template_digest=d.get("template_digest", ""),
            timings={k: float(v) for k, v in (d.get("timings") or {}).items()},
            error=d.get("error"),
        )


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command. A non-zero ``exit_code`` is a result, not an exception."""

    exit_code: int
    stdout: str
    stderr: str
    signal: int | None = None
    duration_ms: float = 0.0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommandResult:
        return cls(
            exit_code=int(d["exit_code"]),
            stdout=d.get("stdout", ""),
            stderr=d.get("stderr", ""),
            signal=d.get("signal"),
            duration_ms=float(d.get("duration_ms", 0.0)),
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
