"""API keys: generated once, stored only as sha256 hex digests, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from branchbox.errors import UnauthorizedError

KEY_PREFIX = "bb_"


def generate_api_key() -> str:
    """A new random key; store only :func:`hash_api_key` of it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """sha256 hex of the key's bytes (header text is latin-1 decoded: any value hashes, none raises)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def is_key_hash(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class ApiKeyChecker:
    """Checks an ``Authorization`` header against stored key hashes."""

    def __init__(self, key_hashes: Iterable[str], *, required: bool) -> None:
        self._hashes = tuple(h.strip().lower() for h in key_hashes)
        bad = [h for h in self._hashes if not is_key_hash(h)]
        if bad:
            raise ValueError("api key hashes must be 64 lowercase hex digits (sha256); run `branchbox key new`")
        self.required = required

    def check(self, authorization: str | None) -> None:
        """Raise UnauthorizedError unless the header is acceptable."""
        if authorization is None or not authorization.strip():
            if self.required:
                raise UnauthorizedError(
                    "an API key is required: send 'Authorization: Bearer <key>' (SDK: api_key= or BRANCHBOX_API_KEY)"
                )
            return
        if not self._hashes and not self.required:
            return  # no keys configured on a loopback daemon: nothing to check a key against
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthorizedError("malformed Authorization header: use 'Authorization: Bearer <key>'")
        digest = hash_api_key(key.strip())
        ok = False
        for stored in self._hashes:  # compare against every hash so the time does not depend on which matched
            ok |= hmac.compare_digest(digest, stored)
        if not ok:
            raise UnauthorizedError("invalid API key: check BRANCHBOX_API_KEY or the api_key= you passed")

    def is_api_key(self, authorization: str | None) -> bool:
        """True when the header carries one of the daemon's keys (the port proxy does not forward those)."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip() or not self._hashes:
            return False
        digest = hash_api_key(key.strip())
        ok = False
        for stored in self._hashes:
            ok |= hmac.compare_digest(digest, stored)
        return ok


class PortTokens:
    """Per-sandbox tokens for the port proxy: HMAC-SHA256(daemon secret, sandbox id), so a URL handed to a
    browser or a user opens that sandbox's ports and nothing else. The secret is made per daemon start (tokens
    do not survive a restart; ask GET /v1/sandboxes/{id}/network again)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def token(self, sandbox_id: str) -> str:
        return hmac.new(self._secret, sandbox_id.encode(), hashlib.sha256).hexdigest()[:40]

    def check(self, sandbox_id: str, token: str) -> bool:
        """Constant-time; any text is just a wrong token (compare_digest raises on non-ASCII str: compare bytes)."""
        given = token.encode("utf-8", "surrogatepass")
        return hmac.compare_digest(self.token(sandbox_id).encode("ascii"), given)
