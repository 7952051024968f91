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
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


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
