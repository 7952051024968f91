"""E2B's ``Idempotency-Key`` on sandbox creation (``Sandbox.create(idempotency_key=)``): a create retried with the
same key by the same caller gets the sandbox the first one made, never a second sandbox.

Kept for :data:`TTL_S` (at most :data:`MAX_KEYS` keys; the oldest go first) in the daemon's memory and, once the
create succeeded and before it is answered, in the table ``e2b_idempotency`` of its SQLite file: a retry after a
daemon restart (or crash) gets the sandbox the first create made, as a retry before it does. A key's first create
that fails frees the key (the retry tries again); one still running makes the retries wait for it. The same key
with another request body is refused (422)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("branchbox.e2b")

KEY = re.compile(r"^[a-z0-9-]{1,255}$")  # what the SDK allows (1-255 lowercase letters, digits, hyphens)
TTL_S = 24 * 3600.0
MAX_KEYS = 10_000


def _now() -> float:
    """Wall-clock seconds: the persisted keys' time (a restart resets the monotonic clock)."""
    return time.time()


class KeyReusedError(Exception):
    """The key was used by this caller for a different request."""


class _FirstCancelled(Exception):
    pass


@dataclass(slots=True)
class _Entry:
    request: str  # sha256 of the request body
    at: float
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


_SCHEMA = """
CREATE TABLE IF NOT EXISTS e2b_idempotency (
    caller TEXT NOT NULL,
    key TEXT NOT NULL,
    request TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (caller, key)
)
"""


class IdempotencyKeys:
    """``db``: the daemon's SQLite file, where keys outlive the process (None: memory only)."""

    def __init__(self, db: Path | None = None) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}  # insertion order: oldest first
        self._db = db
        self._table = False  # created (once per process, on first use: most daemons never see a key)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection to the daemon's SQLite file (WAL already, set by the Manager's store), in a transaction."""
        assert self._db is not None
        conn = sqlite3.connect(self._db, timeout=10)
        try:
            if not self._table:
                conn.execute(_SCHEMA)
                self._table = True
            with conn:
                yield conn
        finally:
            conn.close()

    def _recorded(self, caller: str, key: str) -> tuple[str, str] | None:
        """(request digest, sandbox id) a create before this process made for the key, within the TTL."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT request, sandbox_id FROM e2b_idempotency WHERE caller = ? AND key = ? AND at > ?",
                (caller, key, _now() - TTL_S),
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def _record(self, caller: str, key: str, digest: str, sid: str) -> None:
        now = _now()
        with self._connect() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO e2b_idempotency VALUES (?, ?, ?, ?, ?)", (caller, key, digest, sid, now)
            )
            conn.execute("DELETE FROM e2b_idempotency WHERE at <= ?", (now - TTL_S,))
            conn.execute(
                "DELETE FROM e2b_idempotency WHERE rowid IN "
                "(SELECT rowid FROM e2b_idempotency ORDER BY at DESC LIMIT -1 OFFSET ?)",
                (MAX_KEYS,),
            )

    def __len__(self) -> int:
        return len(self._entries)

    async def once(self, caller: str, key: str, body: bytes, create: Callable[[], Awaitable[str]]) -> str:
        """The sandbox id ``create`` made for ``(caller, key)``, calling it only if no create has (or is)."""
        self._prune(time.monotonic())
        slot = (caller, key)
        digest = hashlib.sha256(body).hexdigest()
        entry = self._entries.get(slot)
        if entry is not None:
            if entry.request != digest:
                raise KeyReusedError(key)
            try:
                return await asyncio.shield(entry.done)
            except _FirstCancelled:  # its client went away: the next in line creates
                return await self.once(caller, key, body, create)
        if self._db is not None:  # made before a restart?
            recorded = await asyncio.to_thread(self._recorded, caller, key)
            if slot in self._entries:  # another retry got here meanwhile: wait for its create
                return await self.once(caller, key, body, create)
            if recorded is not None:
                if recorded[0] != digest:
                    raise KeyReusedError(key)
                return recorded[1]
        entry = self._entries[slot] = _Entry(digest, time.monotonic())
        try:
            sid = await create()
            if self._db is not None:  # kept before the create is answered: a retry after a restart finds it
                try:
                    await asyncio.to_thread(self._record, caller, key, digest, sid)
                except sqlite3.Error as exc:  # the sandbox exists: answer it, idempotent until a restart only
                    log.warning("e2b.idempotency_not_kept", key=key, sandbox_id=sid, error=str(exc))
        except BaseException as exc:
            if self._entries.get(slot) is entry:
                del self._entries[slot]
            entry.done.set_exception(exc if isinstance(exc, Exception) else _FirstCancelled())
            entry.done.exception()  # marked retrieved: the waiters, if any, get it as well
            raise
        entry.done.set_result(sid)
        return sid

    def _prune(self, now: float) -> None:
        while self._entries:
            slot, oldest = next(iter(self._entries.items()))
            if now - oldest.at < TTL_S and len(self._entries) < MAX_KEYS:
                return
            if not oldest.done.done():  # a create in flight keeps its key (bounded by the creates in flight)
                return
            del self._entries[slot]
