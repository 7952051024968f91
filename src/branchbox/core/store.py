"""SQLite (WAL) store of sandbox, snapshot and layer records. Only the Manager writes it.

Durability: WAL with ``synchronous=NORMAL`` survives a crash of the daemon process at any point (a committed
transaction is in the WAL file before commit returns); only an OS crash can lose the last commits. Snapshot and
layer changes go through :meth:`Store.durable` (``synchronous=FULL`` for that transaction: fsync'd on commit).

A layer is referenced by the ``layers`` chains (JSON lists of layer ids, topmost first) of snapshots and
sandboxes, and by pins (``layer_pins``: a cache such as the git workspaces' commit layers keeps a layer alive
without a sandbox); :meth:`Store.unreferenced_layers` lists those nothing references any more.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchbox.backends.base import SandboxHandle
from branchbox.backends.idranges import CANONICAL_BASE
from branchbox.models import Resources, SandboxInfo, SandboxState, SnapshotInfo, TimeoutPolicy

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
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    parent TEXT,
    driver TEXT NOT NULL,
    size_bytes INTEGER,
    files INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_pins (
    layer TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (layer, owner)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    sandbox_id TEXT,
    template TEXT NOT NULL,
    template_digest TEXT NOT NULL,
    layers TEXT NOT NULL,
    driver TEXT NOT NULL,
    created_at REAL NOT NULL,
    hidden INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL,
    disk_mb INTEGER
);
"""
SCHEMA_VERSION = "1"


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    info: SandboxInfo
    handle: SandboxHandle | None
    pool: str | None = None  # set while the sandbox waits, unclaimed, in the warm pool of that template
    layers: tuple[str, ...] = ()  # the lower chain its overlay mounts above the template, topmost first
    uid_base: int = CANONICAL_BASE  # host uid of its root (its own range; older daemons' sandboxes: the canonical)


@dataclass(frozen=True, slots=True)
class LayerRecord:
    id: str
    path: Path
    parent: str | None
    driver: str
    size_bytes: int | None
    files: int | None
    created_at: float
    uid_base: int = CANONICAL_BASE  # host uid of root in the range its files are owned by (the writer's)


def _resources_json(res: Resources) -> str:
    return json.dumps({"cpu": res.cpu, "memory_mb": res.memory_mb, "pids": res.pids, "disk_mb": res.disk_mb})


def _lifecycle_json(policy: TimeoutPolicy) -> str:
    return json.dumps({"on_timeout": policy.on_timeout, "auto_resume": policy.auto_resume, "timeout": policy.timeout})


def _lifecycle_from_json(raw: str | None) -> TimeoutPolicy:
    d = json.loads(raw or "{}")  # records older than pause on timeout: {}
    return TimeoutPolicy(on_timeout=d.get("on_timeout", "destroy"), auto_resume=bool(d.get("auto_resume", False)),
                         timeout=d.get("timeout"))  # fmt: skip


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
        # 0600 before SQLite opens it: the -wal and -shm files it makes take the database's mode; the records
        # hold every sandbox's env (secrets passed at create)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(sandboxes)")}
        if "layers" not in cols:  # data dirs made before snapshots existed
            self._db.execute("ALTER TABLE sandboxes ADD COLUMN layers TEXT NOT NULL DEFAULT '[]'")
        # per-sandbox uid ranges (issue 22.1): records of older daemons are in the canonical range they all shared
        for table in ("sandboxes", "layers"):
            if "uid_base" not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN uid_base INTEGER NOT NULL DEFAULT {CANONICAL_BASE}")
        if "lifecycle" not in {r[1] for r in self._db.execute("PRAGMA table_info(sandboxes)")}:  # before on_timeout
            self._db.execute("ALTER TABLE sandboxes ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}'")
        if "disk_mb" not in {r[1] for r in self._db.execute("PRAGMA table_info(snapshots)")}:  # before disk limits
            self._db.execute("ALTER TABLE snapshots ADD COLUMN disk_mb INTEGER")

    @contextlib.contextmanager
    def durable(self) -> Iterator[None]:
        """One transaction that is on disk (fsync'd) when the block returns, not only in the OS cache."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        self._db.close()

    def insert(
        self,
        info: SandboxInfo,
        handle: SandboxHandle | None = None,
        *,
        pool: str | None = None,
        layers: Sequence[str] = (),
        uid_base: int = CANONICAL_BASE,
    ) -> None:
        self._db.execute(
            "INSERT INTO sandboxes (id, template, template_digest, backend, state, created_at, expires_at,"
            " resources, metadata, env, hostname, source, timings, error, handle, pool, layers, uid_base, lifecycle)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                info.id,
                info.template,
                info.template_digest,
                info.backend,
                info.state.value,
                info.created_at,
                info.expires_at,
                _resources_json(info.resources),
                json.dumps(dict(info.metadata)),
                json.dumps(dict(info.env)),
                info.hostname,
                info.source,
                json.dumps(dict(info.timings)),
                info.error,
                _handle_to_json(handle),
                pool,
                json.dumps(list(layers)),
                uid_base,
                _lifecycle_json(info.lifecycle),
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
            elif k == "resources":
                v = _resources_json(value)
            elif k == "lifecycle":
                v = _lifecycle_json(value)
            elif isinstance(value, SandboxState):
                v = value.value
            elif isinstance(value, Mapping):
                v = json.dumps(dict(value))
            elif k == "layers":
                v = json.dumps(list(value))
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

    def states(self) -> Iterator[tuple[str, SandboxState]]:
        """Each sandbox's id and recorded state (warm pool members left out)."""
        for sid, state in self._db.execute("SELECT id, state FROM sandboxes WHERE pool IS NULL"):
            yield sid, SandboxState(state)

    @staticmethod
    def _record(row: tuple[Any, ...]) -> SandboxRecord:
        (sid, template, digest, backend, state, created_at, expires_at, resources, metadata, env, hostname,
         source, timings, error, handle, pool, layers, uid_base, lifecycle) = row  # fmt: skip
        r = json.loads(resources)
        info = SandboxInfo(
            id=sid,
            template=template,
            template_digest=digest,
            backend=backend,
            state=SandboxState(state),
            created_at=created_at,
            expires_at=expires_at,
            resources=Resources(
                cpu=float(r["cpu"]),
                memory_mb=int(r["memory_mb"]),
                pids=int(r["pids"]),
                disk_mb=int(r.get("disk_mb", 0)),
            ),  # records older than disk limits: none
            metadata=json.loads(metadata),
            env=json.loads(env),
            hostname=hostname,
            source=source,
            timings=json.loads(timings),
            error=error,
            lifecycle=_lifecycle_from_json(lifecycle),
        )
        return SandboxRecord(
            info=info,
            handle=_handle_from_json(handle),
            pool=pool,
            layers=tuple(json.loads(layers or "[]")),
            uid_base=int(uid_base),
        )

    # ------------------------------------------------------------------ layers and snapshots
    def insert_layer(self, layer: LayerRecord) -> None:
        self._db.execute(
            "INSERT INTO layers (id, path, parent, driver, size_bytes, files, created_at, uid_base)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (layer.id, str(layer.path), layer.parent, layer.driver, layer.size_bytes, layer.files, layer.created_at,
             layer.uid_base),
        )  # fmt: skip

    def id_ranges_in_use(self) -> set[int]:
        """The uid ranges (host uid of root) that sandbox records and layers own files or processes in."""
        rows = self._db.execute("SELECT uid_base FROM sandboxes UNION SELECT uid_base FROM layers")
        return {int(r[0]) for r in rows}

    def layer_uid_bases(self, layer_ids: Sequence[str]) -> list[int]:
        """The range each layer's files are owned in (the canonical one for a layer not recorded)."""
        return [x.uid_base if (x := self.get_layer(lid)) is not None else CANONICAL_BASE for lid in layer_ids]

    def set_layer_usage(self, layer_id: str, size_bytes: int | None, files: int | None) -> None:
        self._db.execute("UPDATE layers SET size_bytes=?, files=? WHERE id=?", (size_bytes, files, layer_id))

    def get_layer(self, layer_id: str) -> LayerRecord | None:
        row = self._db.execute("SELECT * FROM layers WHERE id=?", (layer_id,)).fetchone()
        return None if row is None else self._layer(row)

    def all_layers(self) -> list[LayerRecord]:
        return [self._layer(r) for r in self._db.execute("SELECT * FROM layers ORDER BY created_at")]

    def delete_layer(self, layer_id: str) -> None:
        self._db.execute("DELETE FROM layers WHERE id=?", (layer_id,))

    def unreferenced_layers(self) -> list[LayerRecord]:
        """Layers that no snapshot and no sandbox record names in its chain."""
        rows = self._db.execute(
            "SELECT * FROM layers WHERE id NOT IN (SELECT j.value FROM snapshots, json_each(snapshots.layers) j)"
            " AND id NOT IN (SELECT j.value FROM sandboxes, json_each(sandboxes.layers) j)"
            " AND id NOT IN (SELECT layer FROM layer_pins)"
        )
        return [self._layer(r) for r in rows]

    def pin_layer(self, layer_id: str, owner: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO layer_pins (layer, owner) VALUES (?, ?)", (layer_id, owner))

    def unpin_layers(self, owner: str) -> None:
        self._db.execute("DELETE FROM layer_pins WHERE owner=?", (owner,))

    def insert_snapshot(self, snap: SnapshotInfo, *, hidden: bool = False, disk_mb: int | None = None) -> None:
        """``disk_mb``: the disk limit of the sandbox it was taken from (its restores inherit it)."""
        self._db.execute(
            "INSERT INTO snapshots (id, name, sandbox_id, template, template_digest, layers, driver, created_at,"
            " hidden, timings, disk_mb) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (snap.id, snap.name, snap.sandbox_id, snap.template, snap.template_digest, json.dumps(list(snap.layers)),
             snap.driver, snap.created_at, int(hidden), json.dumps(dict(snap.timings)), disk_mb),
        )  # fmt: skip

    def snapshot_disk_mb(self, snapshot_id: str) -> int | None:
        row = self._db.execute("SELECT disk_mb FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def set_snapshot_layers(self, snapshot_id: str, layers: Sequence[str]) -> None:
        self._db.execute("UPDATE snapshots SET layers=? WHERE id=?", (json.dumps(list(layers)), snapshot_id))

    def get_snapshot(self, id_or_name: str, *, hidden: bool = False) -> SnapshotInfo | None:
        row = self._db.execute(
            f"{_SNAPSHOT_SELECT} WHERE (s.id=? OR s.name=?) AND s.hidden<=? ORDER BY s.id=? DESC LIMIT 1",
            (id_or_name, id_or_name, int(hidden), id_or_name),
        ).fetchone()
        return None if row is None else self._snapshot(row)

    def snapshots(self, *, hidden: bool = False) -> list[SnapshotInfo]:
        rows = self._db.execute(f"{_SNAPSHOT_SELECT} WHERE s.hidden<=? ORDER BY s.created_at", (int(hidden),))
        return [self._snapshot(r) for r in rows]

    def snapshot_bytes(self) -> int:
        """Measured bytes of every layer a snapshot (forks' hidden ones too) names, each layer once; layers not
        measured yet count 0."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM layers"
            " WHERE id IN (SELECT j.value FROM snapshots, json_each(snapshots.layers) j)"
        ).fetchone()
        return int(row[0])

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

    @staticmethod
    def _layer(row: tuple[Any, ...]) -> LayerRecord:
        lid, path, parent, driver, size, files, created, uid_base = row
        return LayerRecord(lid, Path(path), parent, driver, size, files, created, int(uid_base))

    @staticmethod
    def _snapshot(row: tuple[Any, ...]) -> SnapshotInfo:
        sid, name, sandbox_id, template, digest, layers, driver, created, timings, size, files = row
        return SnapshotInfo(
            id=sid,
            name=name,
            sandbox_id=sandbox_id,
            template=template,
            template_digest=digest,
            created_at=created,
            layers=tuple(json.loads(layers)),
            driver=driver,
            size_bytes=size,
            files=files,
            timings=json.loads(timings),
        )


_SNAPSHOT_SELECT = (
    "SELECT s.id, s.name, s.sandbox_id, s.template, s.template_digest, s.layers, s.driver, s.created_at,"
    " s.timings, l.size_bytes, l.files FROM snapshots s LEFT JOIN layers l ON l.id = json_extract(s.layers, '$[0]')"
)
