"""E2B's ``Idempotency-Key`` on sandbox creation (``Sandbox.create(idempotency_key=)``): a create retried with the
same key by the same caller gets the sandbox the first one made, never a second sandbox.

Kept in the daemon's memory for :data:`TTL_S` (at most :data:`MAX_KEYS` keys; the oldest go first), so a retry
after a daemon restart creates again. A key's first create that fails frees the key (the retry tries again);
one still running makes the retries wait for it. The same key with another request body is refused (422)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

KEY = re.compile(r"^[a-z0-9-]{1,255}$")  # what the SDK allows (1-255 lowercase letters, digits, hyphens)
TTL_S = 24 * 3600.0
MAX_KEYS = 10_000


class KeyReusedError(Exception):
    """The key was used by this caller for a different request."""


class _FirstCancelled(Exception):
    pass


@dataclass(slots=True)
class _Entry:
    request: str  # sha256 of the request body
    at: float
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class IdempotencyKeys:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}  # insertion order: oldest first

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
        entry = self._entries[slot] = _Entry(digest, time.monotonic())
        try:
            sid = await create()
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
