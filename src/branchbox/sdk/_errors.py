"""SDK exceptions, mapped from the API's stable ``error.code`` by a table (mirrors branchbox.errors).

Hierarchy::

    SandboxError
    ├── BadRequestError (ValueError)  bad_request, invalid_path, invalid_template_spec, not_a_directory,
    │                                 is_a_directory, invalid_network_policy, invalid_repository_url, invalid_ssh_key,
    │                                 invalid_image_reference, unsupported_image, unsafe_image, image_too_large
    ├── AuthenticationError           unauthorized
    ├── PermissionDeniedError         permission_denied, repository_auth_failed, registry_auth_failed,
    │                                 host_not_allowed, origin_not_allowed
    ├── NotFoundError (LookupError)   not_found, sandbox_not_found, template_not_found, snapshot_not_found,
    │                                 file_not_found, process_not_found, workspace_not_found,
    │                                 repository_not_found, ref_not_found, image_not_found, node_not_found
    ├── ConflictError                 conflict, invalid_state, file_exists
    ├── RateLimitError                limit_exceeded
    ├── TimeoutException (TimeoutError) timeout, and client-side request timeouts
    ├── NotSupportedError             not_supported
    ├── AgentError                    agent_error, agent_disconnected
    ├── ServerError                   internal, backend_error, network_error, port_unreachable,
    │   │                             template_build_failed, git_error, repository_unreachable,
    │   │                             registry_unreachable, image_digest_mismatch, no_capacity,
    │   │                             sandbox_lost, node_unreachable, unknown codes
    │   └── DiskFullError             disk_full (the daemon's disk is below its reserve: free space)
    └── ConnectionError_ (ConnectionError) the daemon could not be reached
"""

from __future__ import annotations

import builtins
from typing import Any


class SandboxError(Exception):
    """Root of every SDK error. ``code``: the API's stable error code; ``status``: HTTP status (0: none)."""

    def __init__(self, message: str, *, code: str = "internal", status: int = 0, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.details = details


class BadRequestError(SandboxError, ValueError):
    pass


class AuthenticationError(SandboxError):
    pass


class PermissionDeniedError(SandboxError):
    pass


class NotFoundError(SandboxError, LookupError):
    pass


class SandboxNotFoundError(NotFoundError):
    pass


class TemplateNotFoundError(NotFoundError):
    pass


class FileNotFoundError_(NotFoundError):
    pass


class ProcessNotFoundError(NotFoundError):
    pass


class ConflictError(SandboxError):
    pass


class InvalidStateError(ConflictError):
    pass


class RateLimitError(SandboxError):
    pass


class TimeoutException(SandboxError, builtins.TimeoutError):
    pass


class NotSupportedError(SandboxError):
    pass


class AgentError(SandboxError):
    pass


class ServerError(SandboxError):
    pass


class DiskFullError(ServerError):
    pass


class ConnectionError_(SandboxError, builtins.ConnectionError):
    pass


ERROR_TABLE: dict[str, type[SandboxError]] = {
    "bad_request": BadRequestError,
    "invalid_path": BadRequestError,
    "invalid_template_spec": BadRequestError,
    "not_a_directory": BadRequestError,
    "is_a_directory": BadRequestError,
    "invalid_network_policy": BadRequestError,
    "unauthorized": AuthenticationError,
    "permission_denied": PermissionDeniedError,
    "not_found": NotFoundError,
    "sandbox_not_found": SandboxNotFoundError,
    "template_not_found": TemplateNotFoundError,
    "snapshot_not_found": NotFoundError,
    "file_not_found": FileNotFoundError_,
    "process_not_found": ProcessNotFoundError,
    "conflict": ConflictError,
    "invalid_state": InvalidStateError,
    "file_exists": ConflictError,
    "limit_exceeded": RateLimitError,
    "timeout": TimeoutException,
    "not_supported": NotSupportedError,
    "agent_error": AgentError,
    "agent_disconnected": AgentError,
    "internal": ServerError,
    "backend_error": ServerError,
    "template_build_failed": ServerError,
    "network_error": ServerError,
    "port_unreachable": ServerError,
    "invalid_repository_url": BadRequestError,
    "invalid_ssh_key": BadRequestError,
    "payload_too_large": BadRequestError,  # a size bound (status 413); the message names it
    "workspace_not_found": NotFoundError,
    "repository_not_found": NotFoundError,
    "ref_not_found": NotFoundError,
    "repository_auth_failed": PermissionDeniedError,
    "git_error": ServerError,
    "repository_unreachable": ServerError,
    "disk_full": DiskFullError,
    "invalid_image_reference": BadRequestError,
    "unsupported_image": BadRequestError,
    "unsafe_image": BadRequestError,
    "image_too_large": BadRequestError,  # status 413, like payload_too_large
    "image_not_found": NotFoundError,
    "registry_auth_failed": PermissionDeniedError,
    "registry_unreachable": ServerError,
    "image_digest_mismatch": ServerError,
    # the API's guard (403): a Host not among the daemon's names (DNS rebinding) or a browser origin not allowed;
    # the message names the setting to change (allowed_hosts, allowed_origins)
    "host_not_allowed": PermissionDeniedError,
    "origin_not_allowed": PermissionDeniedError,
    "node_not_found": NotFoundError,
    "no_capacity": ServerError,  # 503: no fleet node can take the sandbox now
    "sandbox_lost": ServerError,  # 503: the fleet node holding the sandbox is unreachable
    "node_unreachable": ServerError,  # 503: a fleet node did not answer a fleet-wide call (a pool's PUT)
}


def error_for(code: str, message: str, *, status: int = 0, details: Any = None) -> SandboxError:
    """The exception for an API error code (unknown codes: by status, else ServerError)."""
    cls = ERROR_TABLE.get(code)
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 or status == 0 else BadRequestError)
    return cls(message, code=code, status=status, details=details)


_BY_STATUS: dict[int, type[SandboxError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    429: RateLimitError,
    501: NotSupportedError,
    504: TimeoutException,
}
