"""Settings of the HTTP app (pure data; the daemon fills them from its config)."""

from __future__ import annotations

from dataclasses import dataclass

from branchbox._version import VERSION

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """``api_key_hashes`` are sha256 hex digests of the accepted keys (see :mod:`branchbox.api.auth`).

    Keys are required when ``require_auth`` is True, or when it is None and ``host`` is not loopback.
    When keys are optional but some are configured, a request that carries a key must carry a valid one.
    ``allowed_hosts``, ``allowed_origins``, ``port_domain`` and the body limits are those of
    :mod:`branchbox.api.guard`.
    """

    host: str = "127.0.0.1"
    port: int = 7077
    api_key_hashes: tuple[str, ...] = ()
    require_auth: bool | None = None
    version: str = VERSION
    allowed_hosts: tuple[str, ...] = ()  # Host names the API answers besides localhost, the bind host, IP literals
    allowed_origins: tuple[str, ...] = ()  # browser origins whose pages may call the API (e.g. http://localhost:3000)
    port_domain: str = "localhost"  # sandbox ports are served at {port}-{sandbox_id}.{port_domain}
    max_body_bytes: int = 16 * 1024 * 1024  # a request body (JSON)
    max_upload_bytes: int = 8 * 1024 * 1024 * 1024  # a file upload, a tar upload, a body sent to a sandbox port
    max_ws_message_bytes: int = 16 * 1024 * 1024  # a WebSocket message relayed by the port proxy, either way

    @property
    def auth_required(self) -> bool:
        if self.require_auth is not None:
            return self.require_auth
        return self.host not in LOOPBACK_HOSTS
