"""SQLite (WAL) store of sandbox records. Only the Manager writes it.

Durability: WAL with ``synchronous=NORMAL`` survives a crash of the daemon process at any point (a committed
transaction is in the WAL file before commit returns); only an OS crash can lose the last commits.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchbox.backends.base import SandboxHandle
from branchbox.core.models import Resources, SandboxInfo, SandboxState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    template_digest TEXT NOT NULL,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    resources TEXT NOT NULL,
    metadata TEXT NOT NULL,
    env TEXT NOT NULL,
    hostname TEXT NOT NULL,
    source TEXT NOT NULL,
    timings TEXT NOT NULL,
    error TEXT,
    handle TEXT,
    pool TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    info: SandboxInfo
    handle: SandboxHandle | None
    pool: str | None = None  # set while the sandbox waits, unclaimed, in the warm pool of that template


def _handle_to_json(h: SandboxHandle | None) -> str | None:
    if h is None:
        return None
    return json.dumps(
        {
            "sandbox_id": h.sandbox_id,
            "pid": h.pid,
            "pid_start_time": h.pid_start_time,
            "agent_socket": str(h.agent_socket),
            "extra": dict(h.extra),
        }
    )


def _handle_from_json(s: str | None) -> SandboxHandle | None:
    if not s:
        return None
    d = json.loads(s)
    return SandboxHandle(
        sandbox_id=d["sandbox_id"],
        pid=int(d["pid"]),
        pid_start_time=int(d["pid_start_time"]),
        agent_socket=Path(d["agent_socket"]),
        extra=dict(d.get("extra", {})),
    )


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        self._db.close()

    def insert(self, info: SandboxInfo, handle: SandboxHandle | None = None, *, pool: str | None = None) -> None:
        self._db.execute(
            "INSERT INTO sandboxes (id, template, template_digest, backend, state, created_at, expires_at,"
            " resources, metadata, env, hostname, source, timings, error, handle, pool)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                info.id,
                info.template,
                info.template_digest,
                info.backend,
                info.state.value,
                info.created_at,
                info.expires_at,
                json.dumps(
                    {"cpu": info.resources.cpu, "memory_mb": info.resources.memory_mb, "pids": info.resources.pids}
                ),
                json.dumps(dict(info.metadata)),
                json.dumps(dict(info.env)),
                info.hostname,
                info.source,
                json.dumps(dict(info.timings)),
                info.error,
                _handle_to_json(handle),
                pool,
            ),
        )

    def update(self, sandbox_id: str, **fields: Any) -> None:
        """Update columns; ``state`` may be a SandboxState, ``handle`` a SandboxHandle, dicts are JSON-encoded."""
        cols: list[str] = []
        vals: list[Any] = []
        for k, value in fields.items():
            v = value
            if k == "handle":
                v = _handle_to_json(value)
            elif isinstance(value, SandboxState):
                v = value.value
            elif isinstance(value, Mapping):
                v = json.dumps(dict(value))
            cols.append(f"{k}=?")
            vals.append(v)
        vals.append(sandbox_id)
        self._db.execute(f"UPDATE sandboxes SET {', '.join(cols)} WHERE id=?", vals)  # noqa: S608 - fixed names

    def delete(self, sandbox_id: str) -> None:
        self._db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute("SELECT * FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
        return None if row is None else self._record(row)

    def all(self) -> Iterator[SandboxRecord]:
        for row in self._db.execute("SELECT * FROM sandboxes ORDER BY created_at"):
            yield self._record(row)

    @staticmethod
    def _record(row: tuple[Any, ...]) -> SandboxRecord:
        (sid, template, digest, backend, state, created_at, expires_at, resources, metadata, env, hostname,
         source, timings, error, handle, pool) = row  # fmt: skip
        r = json.loads(resources)
        info = SandboxInfo(
            id=sid,
            template=template,
            template_digest=digest,
            backend=backend,
            state=SandboxState(state),
            created_at=created_at,
            expires_at=expires_at,
            resources=Resources(cpu=float(r["cpu"]), memory_mb=int(r["memory_mb"]), pids=int(r["pids"])),
            metadata=json.loads(metadata),
            env=json.loads(env),
            hostname=hostname,
            source=source,
            timings=json.loads(timings),
            error=error,
        )
        return SandboxRecord(info=info, handle=_handle_from_json(handle), pool=pool)
