"""branchbox Python SDK (httpx). Imports nothing of the daemon; it could ship as its own distribution.

Settings precedence: per call (``request_timeout=``) > client (``Sandbox.create(base_url=, api_key=)``) >
environment (``BRANCHBOX_URL``, ``BRANCHBOX_API_KEY``, ``BRANCHBOX_REQUEST_TIMEOUT``) > defaults
(``http://127.0.0.1:7077``, no key, 60 s).
"""

from branchbox.sdk._async import AsyncCommandHandle, AsyncPtyHandle, AsyncSandbox
from branchbox.sdk._config import DEFAULT_URL, ConnectionConfig
from branchbox.sdk._errors import (
    ERROR_TABLE,
    AgentError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError_,
    FileNotFoundError_,
    InvalidStateError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    ProcessNotFoundError,
    RateLimitError,
    SandboxError,
    SandboxNotFoundError,
    ServerError,
    TemplateNotFoundError,
    TimeoutException,
    error_for,
)
from branchbox.sdk._models import CommandResult, EntryInfo, ProcessInfo, SandboxInfo, TemplateInfo
from branchbox.sdk._sync import CommandHandle, PtyHandle, Sandbox

__all__ = [
    "DEFAULT_URL",
    "ERROR_TABLE",
    "AgentError",
    "AsyncCommandHandle",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "AuthenticationError",
    "BadRequestError",
    "CommandHandle",
    "CommandResult",
    "ConflictError",
    "ConnectionConfig",
    "ConnectionError_",
    "EntryInfo",
    "FileNotFoundError_",
    "InvalidStateError",
    "NotFoundError",
    "NotSupportedError",
    "PermissionDeniedError",
    "ProcessInfo",
    "ProcessNotFoundError",
    "PtyHandle",
    "RateLimitError",
    "Sandbox",
    "SandboxError",
    "SandboxInfo",
    "SandboxNotFoundError",
    "ServerError",
    "TemplateInfo",
    "TemplateNotFoundError",
    "TimeoutException",
    "error_for",
]
