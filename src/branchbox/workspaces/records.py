"""The workspace cache's tables in the daemon's SQLite file (its own connection; only this package writes them).

* ``git_mirrors(key, url, created_at, last_used, size_bytes)``: one row per mirror (credential-free URL).
* ``git_layers(layer_id, repo_key, commit_id, branch, path, created_at, last_used, size_bytes, boot_id,
  durable, chain)``: one commit layer per (repository, commit, branch or '' for a detached HEAD, path); the layer
  itself is a row of the Manager's ``layers`` table kept alive by the pin ``git:<layer_id>``. ``chain``: the
  layers below it (topmost first) when it only holds the difference to an earlier commit's layer; the pin
  ``git:<layer_id>`` holds those too.
* ``workspaces(id, status, sandbox_id, repository_url, branch, commit_id, path, template, cached, timings,
  error, created_at)``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchbox.workspaces.models import WorkspaceInfo, WorkspaceStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS git_mirrors (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL,
    size_bytes INTEGER
);
CREATE TABLE IF NOT EXISTS git_layers (
    layer_id TEXT PRIMARY KEY,
    repo_key TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    branch TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL,
    size_bytes INTEGER,
    boot_id TEXT NOT NULL,
    durable INTEGER NOT NULL DEFAULT 0,
    chain TEXT NOT NULL DEFAULT '[]',
    UNIQUE (repo_key, commit_id, branch, path)
);
CREATE TABLE IF NOT EXISTS workspaces (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    sandbox_id TEXT,
    repository_url TEXT NOT NULL,
    branch TEXT,
    commit_id TEXT,
    path TEXT NOT NULL,
    template TEXT NOT NULL,
    cached INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class CommitLayer:
    layer_id: str
    repo_key: str
    commit_id: str
    branch: str
    path: str
    last_used: float
    size_bytes: int | None
    boot_id: str
    durable: bool
    chain: tuple[str, ...] = ()


class WorkspaceRecords:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ mirrors
    def touch_mirror(self, key: str, url: str) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO git_mirrors (key, url, created_at, last_used) VALUES (?,?,?,?)"
            " ON CONFLICT(key) DO UPDATE SET last_used=excluded.last_used, size_bytes=NULL",  # measured again
            (key, url, now, now),
        )

    def mirrors(self) -> list[tuple[str, float, int | None]]:
        return list(self._db.execute("SELECT key, last_used, size_bytes FROM git_mirrors"))

    def set_mirror_size(self, key: str, size: int) -> None:
        self._db.execute("UPDATE git_mirrors SET size_bytes=? WHERE key=?", (size, key))

    def delete_mirror(self, key: str) -> None:
        self._db.execute("DELETE FROM git_mirrors WHERE key=?", (key,))

    # ------------------------------------------------------------------ commit layers
    def find_layer(self, repo_key: str, commit: str, branch: str | None, path: str) -> CommitLayer | None:
        """The layer for a full or abbreviated commit id (an ambiguous abbreviation finds nothing)."""
        rows = list(self._db.execute(
            "SELECT * FROM git_layers WHERE repo_key=? AND commit_id LIKE ? AND branch=? AND path=? LIMIT 2",
            (repo_key, commit + "%", branch or "", path),
        ))  # fmt: skip
        return self._layer(rows[0]) if len(rows) == 1 else None

    def add_layer(self, layer: CommitLayer) -> None:
        self._db.execute(
            "INSERT INTO git_layers (layer_id, repo_key, commit_id, branch, path, created_at, last_used, size_bytes,"
            " boot_id, durable, chain) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (layer.layer_id, layer.repo_key, layer.commit_id, layer.branch, layer.path, time.time(),
             layer.last_used, layer.size_bytes, layer.boot_id, int(layer.durable), json.dumps(list(layer.chain))),
        )  # fmt: skip

    def recent_layers(self, repo_key: str, branch: str | None, path: str, limit: int = 4) -> list[CommitLayer]:
        """The most recently used layers of one repository, branch and path: bases for a difference layer."""
        rows = self._db.execute(
            "SELECT * FROM git_layers WHERE repo_key=? AND branch=? AND path=? ORDER BY last_used DESC LIMIT ?",
            (repo_key, branch or "", path, limit),
        )
        return [self._layer(r) for r in rows]

    def touch_layer(self, layer_id: str) -> None:
        self._db.execute("UPDATE git_layers SET last_used=? WHERE layer_id=?", (time.time(), layer_id))

    def set_layer(self, layer_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._db.execute(f"UPDATE git_layers SET {cols} WHERE layer_id=?", (*fields.values(), layer_id))  # noqa: S608

    def layers(self) -> list[CommitLayer]:
        return [self._layer(r) for r in self._db.execute("SELECT * FROM git_layers")]

    def delete_layer(self, layer_id: str) -> None:
        self._db.execute("DELETE FROM git_layers WHERE layer_id=?", (layer_id,))

    @staticmethod
    def _layer(r: tuple[Any, ...]) -> CommitLayer:
        lid, key, commit, branch, path, _created, last_used, size, boot_id, durable, chain = r
        return CommitLayer(lid, key, commit, branch, path, last_used, size, boot_id, bool(durable),
                           tuple(json.loads(chain)))  # fmt: skip

    # ------------------------------------------------------------------ workspaces
    def insert(self, ws: WorkspaceInfo) -> None:
        self._db.execute(
            "INSERT INTO workspaces (id, status, sandbox_id, repository_url, branch, commit_id, path, template,"
            " cached, timings, error, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (ws.id, ws.status.value, ws.sandbox_id, ws.repository_url, ws.branch, ws.commit, ws.path, ws.template,
             int(ws.cached), json.dumps(dict(ws.timings)), json.dumps(ws.error) if ws.error else None,
             ws.created_at),
        )  # fmt: skip

    def update(self, ws: WorkspaceInfo) -> None:
        self._db.execute(
            "UPDATE workspaces SET status=?, sandbox_id=?, commit_id=?, cached=?, timings=?, error=? WHERE id=?",
            (ws.status.value, ws.sandbox_id, ws.commit, int(ws.cached), json.dumps(dict(ws.timings)),
             json.dumps(dict(ws.error)) if ws.error else None, ws.id),
        )  # fmt: skip

    def get(self, wid: str) -> WorkspaceInfo | None:
        row = self._db.execute("SELECT * FROM workspaces WHERE id=?", (wid,)).fetchone()
        return None if row is None else self._ws(row)

    def all(self) -> list[WorkspaceInfo]:
        return [self._ws(r) for r in self._db.execute("SELECT * FROM workspaces ORDER BY created_at")]

    def delete(self, wid: str) -> None:
        self._db.execute("DELETE FROM workspaces WHERE id=?", (wid,))

    @staticmethod
    def _ws(r: tuple[Any, ...]) -> WorkspaceInfo:
        wid, status, sid, url, branch, commit, path, template, cached, timings, error, created = r
        return WorkspaceInfo(
            id=wid, status=WorkspaceStatus(status), repository_url=url, branch=branch, commit=commit, path=path,
            template=template, created_at=created, sandbox_id=sid, cached=bool(cached), timings=json.loads(timings),
            error=json.loads(error) if error else None,
        )  # fmt: skip
