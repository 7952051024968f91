"""Per-sandbox envd access tokens and the signatures of E2B's signed file URLs.

A sandbox's token is HMAC-SHA256(the daemon's E2B secret, sandbox id): nothing per sandbox is stored, and the
secret lives in the data dir (``e2b.key``, 0600), so tokens the SDK holds keep working across daemon restarts
(paused sandboxes survive a restart; their clients reconnect with the token they had).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "e2b.key"


def load_secret(data_dir: Path) -> bytes:
    """The daemon's E2B secret, made on first use (32 random bytes, 0600)."""
    path = data_dir / KEY_FILE
    try:
        data = path.read_bytes()
        if len(data) == 32:
            return data
    except FileNotFoundError:
        pass
    data = secrets.token_bytes(32)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # first writer wins; a concurrent start reads the winner's key
    except FileExistsError:
        data = path.read_bytes()
    finally:
        tmp.unlink()
    return data


class Tokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def token(self, sandbox_id: str) -> str:
        digest = hmac.new(self._secret, b"envd\0" + sandbox_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def check(self, sandbox_id: str, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.token(sandbox_id), token)


def file_signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """The signature E2B's SDK puts in a signed ``/files`` URL: ``v1_`` + unpadded base64 of
    sha256("path:operation:user:token[:expiration]")."""
    raw = f"{path}:{operation}:{user}:{token}" + ("" if expiration is None else f":{expiration}")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).decode().rstrip("=")
