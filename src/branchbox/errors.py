"""Typed errors with stable codes.

Every error branchbox raises is a :class:`BranchboxError`. Each class carries a stable ``code`` (the string the
HTTP API puts in ``{"error": {"code", "message"}}`` and the SDK maps back to a class) and the HTTP status that
goes with it. Messages say what to change.

Hierarchy::

    BranchboxError                      internal            500
    ├── BadRequestError (ValueError)    bad_request         400
    │   ├── InvalidPathError            invalid_path        400
    │   ├── TemplateSpecError           invalid_template_spec 400
    │   ├── NetworkPolicyError          invalid_network_policy 400
    │   ├── NotADirectoryInSandboxError not_a_directory     400
    │   ├── IsADirectoryInSandboxError  is_a_directory      400
    │   ├── RepositoryUrlError          invalid_repository_url 400
    │   ├── ImageReferenceError         invalid_image_reference 400 (not a transport:target skopeo knows)
    │   ├── UnsupportedImageError       unsupported_image   400  (media type, platform or schema)
    │   ├── UnsafeImageError            unsafe_image        400  (a layer escapes the root, bad whiteout, ...)
    │   └── PayloadTooLargeError        payload_too_large   413  (a size bound of limits.py)
    │       └── ImageTooLargeError      image_too_large     413  (an image over its unpacked size/file cap)
    ├── UnauthorizedError               unauthorized        401
    ├── NotFoundError (LookupError)     not_found           404
    │   ├── SandboxNotFoundError        sandbox_not_found   404
    │   ├── TemplateNotFoundError       template_not_found  404
    │   ├── SnapshotNotFoundError       snapshot_not_found  404
    │   ├── FileNotFoundInSandboxError  file_not_found      404
    │   ├── ProcessNotFoundError        process_not_found   404
    │   ├── WorkspaceNotFoundError      workspace_not_found 404
    │   ├── RepositoryNotFoundError     repository_not_found 404
    │   ├── RefNotFoundError            ref_not_found       404  (missing branch or commit)
    │   ├── ImageNotFoundError          image_not_found     404  (no such image, tag, archive or layout)
    │   └── NodeNotFoundError           node_not_found      404  (fleet: no such node)
    ├── ConflictError                   conflict            409
    │   ├── InvalidStateError           invalid_state       409
    │   └── FileExistsInSandboxError    file_exists         409
    ├── PermissionDeniedError           permission_denied   403
    │   ├── RepositoryAuthError         repository_auth_failed 403
    │   ├── RegistryAuthError           registry_auth_failed 403
    │   ├── HostNotAllowedError         host_not_allowed    403  (a Host header not on the API's allow-list)
    │   └── OriginNotAllowedError       origin_not_allowed  403  (a browser page of another origin)
    ├── LimitExceededError              limit_exceeded      429
    ├── DiskFullError                   disk_full           507  (the data dir's free space is below its reserve)
    ├── TimeoutError_ (TimeoutError)    timeout             504
    ├── NotSupportedError               not_supported       501
    ├── TemplateBuildError              template_build_failed 500
    ├── BackendError                    backend_error       500
    ├── NoCapacityError                 no_capacity         503  (fleet: no node can take the sandbox)
    ├── SandboxLostError                sandbox_lost        503  (fleet: the sandbox's node is gone)
    ├── NodeUnreachableError            node_unreachable    503  (fleet: a node did not answer a fleet-wide call)
    │   └── NetworkError                network_error       500
    ├── PortUnreachableError            port_unreachable    502
    ├── GitError                        git_error           500
    │   └── RepositoryUnreachableError  repository_unreachable 502  (connect failed, or the server died mid-fetch)
    ├── RegistryUnreachableError        registry_unreachable 502  (an image registry or Docker daemon)
    ├── ImageDigestMismatchError        image_digest_mismatch 502 (a blob is not what its digest says)
    └── AgentError                      agent_error         502
        └── AgentDisconnectedError      agent_disconnected  502

``ERROR_CLASSES`` maps each code to its class (the SDK keeps its own copy of the same table).
"""

from __future__ import annotations

import builtins
from typing import Any, ClassVar


class BranchboxError(Exception):
    """Root of every branchbox error."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequestError(BranchboxError, ValueError):
    code = "bad_request"
    http_status = 400


class InvalidPathError(BadRequestError):
    code = "invalid_path"


class TemplateSpecError(BadRequestError):
    code = "invalid_template_spec"


class NetworkPolicyError(BadRequestError):
    """An entry of allow_out/deny_out is neither a CIDR nor a domain name (or is not allowed)."""

    code = "invalid_network_policy"


class UnauthorizedError(BranchboxError):
    code = "unauthorized"
    http_status = 401


class PermissionDeniedError(BranchboxError):
    code = "permission_denied"
    http_status = 403


class NotFoundError(BranchboxError, LookupError):
    code = "not_found"
    http_status = 404


class SandboxNotFoundError(NotFoundError):
    code = "sandbox_not_found"


class TemplateNotFoundError(NotFoundError):
    code = "template_not_found"


class SnapshotNotFoundError(NotFoundError):
    code = "snapshot_not_found"


class FileNotFoundInSandboxError(NotFoundError):
    code = "file_not_found"


class ProcessNotFoundError(NotFoundError):
    code = "process_not_found"


class ConflictError(BranchboxError):
    code = "conflict"
    http_status = 409


class InvalidStateError(ConflictError):
    code = "invalid_state"


class FileExistsInSandboxError(ConflictError):
    code = "file_exists"


class NotADirectoryInSandboxError(BadRequestError):
    code = "not_a_directory"


class IsADirectoryInSandboxError(BadRequestError):
    code = "is_a_directory"


class PayloadTooLargeError(BadRequestError):
    """An input above one of the size bounds of :mod:`branchbox.limits` (a command, stdin, env, metadata,
    a path): the message names the bound."""

    code = "payload_too_large"
    http_status = 413


class LimitExceededError(BranchboxError):
    code = "limit_exceeded"
    http_status = 429


class DiskFullError(BranchboxError):
    """The daemon's data dir has less free space than its reserve (``reserve_mb``): nothing that writes to it
    starts (creates, forks, restores, snapshots) until space is freed."""

    code = "disk_full"
    http_status = 507


class TimeoutError_(BranchboxError, builtins.TimeoutError):
    code = "timeout"
    http_status = 504


class NotSupportedError(BranchboxError):
    code = "not_supported"
    http_status = 501


class TemplateBuildError(BranchboxError):
    code = "template_build_failed"


class BackendError(BranchboxError):
    code = "backend_error"


class NetworkError(BackendError):
    """Setting up a sandbox's network (veth, addresses, nftables, DNS) failed on the host."""

    code = "network_error"


class NoCapacityError(BranchboxError):
    """A fleet controller found no node able to take a sandbox (or none answered within the timeout)."""

    code = "no_capacity"
    http_status = 503


class SandboxLostError(BranchboxError):
    """The fleet node that holds the sandbox is unreachable (lost, or left the fleet)."""

    code = "sandbox_lost"
    http_status = 503


class NodeUnreachableError(BranchboxError):
    """A fleet node did not answer a request the controller sent it for the whole fleet (e.g. a pool's PUT)."""

    code = "node_unreachable"
    http_status = 503


class PortUnreachableError(BranchboxError):
    """The port proxy could not connect to the sandbox's port (nothing listens there, or not on 0.0.0.0)."""

    code = "port_unreachable"
    http_status = 502


class RepositoryUrlError(BadRequestError):
    code = "invalid_repository_url"


class InvalidSshKeyError(BadRequestError):
    code = "invalid_ssh_key"


class WorkspaceNotFoundError(NotFoundError):
    code = "workspace_not_found"


class RepositoryNotFoundError(NotFoundError):
    code = "repository_not_found"


class RefNotFoundError(NotFoundError):
    code = "ref_not_found"


class NodeNotFoundError(NotFoundError):
    code = "node_not_found"


class RepositoryAuthError(PermissionDeniedError):
    code = "repository_auth_failed"


class HostNotAllowedError(PermissionDeniedError):
    code = "host_not_allowed"


class OriginNotAllowedError(PermissionDeniedError):
    code = "origin_not_allowed"


class GitError(BranchboxError):
    code = "git_error"


class RepositoryUnreachableError(GitError):
    code = "repository_unreachable"
    http_status = 502


class ImageReferenceError(BadRequestError):
    code = "invalid_image_reference"


class UnsupportedImageError(BadRequestError):
    code = "unsupported_image"


class UnsafeImageError(BadRequestError):
    code = "unsafe_image"


class ImageTooLargeError(PayloadTooLargeError):
    code = "image_too_large"


class ImageNotFoundError(NotFoundError):
    code = "image_not_found"


class RegistryAuthError(PermissionDeniedError):
    code = "registry_auth_failed"


class RegistryUnreachableError(BranchboxError):
    code = "registry_unreachable"
    http_status = 502


class ImageDigestMismatchError(BranchboxError):
    code = "image_digest_mismatch"
    http_status = 502


class AgentError(BranchboxError):
    code = "agent_error"
    http_status = 502


class AgentDisconnectedError(AgentError):
    code = "agent_disconnected"


def _all_subclasses(cls: type[BranchboxError]) -> list[type[BranchboxError]]:
    out: list[type[BranchboxError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERROR_CLASSES: dict[str, type[BranchboxError]] = {c.code: c for c in _all_subclasses(BranchboxError)}


def error_from_code(code: str, message: str, **details: Any) -> BranchboxError:
    """Build the error class registered for ``code`` (unknown codes give the root class)."""
    cls = ERROR_CLASSES.get(code, BranchboxError)
    return cls(message, **details)
