"""What the E2B facade keeps per daemon: the Manager, the token maker, and the process handles its open command
streams hold (so ``send_stdin``, ``close_stdin`` and ``resize`` reach the stream that started the process)."""

from __future__ import annotations

import base64
import binascii
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from branchbox.e2b.idempotency import IdempotencyKeys
from branchbox.e2b.tokens import Tokens, load_secret
from branchbox.errors import BranchboxError

if TYPE_CHECKING:
    from branchbox.agentclient.client import ProcessHandle
    from branchbox.core.manager import Manager

# the version of envd this facade answers as: the SDK turns features on by it (stdin 0.3.0, default user 0.4.0,
# close_stdin 0.5.2, octet-stream uploads 0.5.7, per-file metadata 0.6.2, include_entry on watch events 0.6.3).
# 0.6.4 would let the SDK ask for watches on network mounts, which the facade has no check for.
ENVD_VERSION = "0.6.3"
XATTR_PREFIX = "user.e2b."  # where envd keeps a file's metadata (one extended attribute per key), as here
DEFAULT_USER = "root"


@dataclass(slots=True)
class E2BState:
    """``check_key`` is the daemon's API key check (``Authorization`` header value in, UnauthorizedError out)."""

    manager: Manager
    check_key: Callable[[str | None], None]
    tokens: Tokens
    handles: dict[tuple[str, int], ProcessHandle] = field(default_factory=dict)
    watchers: dict[str, Any] = field(default_factory=dict)  # watcher id -> branchbox.e2b.watch.Watcher
    watch_streams: dict[str, int] = field(default_factory=dict)  # sandbox id -> WatchDir streams open
    idempotency: IdempotencyKeys = field(default_factory=IdempotencyKeys)  # Idempotency-Key of creates
    _users: dict[str, str | None] = field(default_factory=dict)  # template digest -> its default user

    @classmethod
    def of(cls, manager: Manager, check_key: Callable[[str | None], None]) -> E2BState:
        data_dir = manager.settings.data_dir
        keys = IdempotencyKeys(data_dir / "state.db")  # kept across restarts with the sandboxes they made
        return cls(manager, check_key, Tokens(load_secret(data_dir)), idempotency=keys)

    def default_user(self, template_digest: str) -> str | None:
        """The ``user`` of the sandbox's template spec (``base``: ``user``), what envd runs as when the request
        names nobody. None for root, or when the template does not say."""
        if template_digest not in self._users:
            try:
                user = self.manager.templates.metadata(template_digest).get("user")
            except (BranchboxError, OSError, ValueError):
                user = None
            self._users[template_digest] = user if isinstance(user, str) and user != DEFAULT_USER else None
        return self._users[template_digest]


def basic_user(authorization: str | None) -> str | None:
    """The user of envd's ``Authorization: Basic base64("user:")`` header (None: the default user)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


def run_as(user: str | None) -> str | None:
    """The ``user=`` to pass to the Manager: None for the sandbox's default user (root)."""
    return None if user in (None, "", DEFAULT_USER) else user


def home_of(user: str | None) -> str:
    return "/root" if run_as(user) is None else f"/home/{user}"


def resolve_path(path: str, user: str | None) -> str:
    """envd resolves a relative path against the user's home directory (and ``~``)."""
    if path == "~" or path.startswith("~/"):
        path = home_of(user) + path[1:]
    if not path.startswith("/"):
        path = posixpath.join(home_of(user), path)
    return path


def iso(ts: float) -> str:
    """RFC 3339 in UTC, as E2B's API and protobuf's JSON timestamps write it."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
