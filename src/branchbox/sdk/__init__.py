"""branchbox Python SDK. Imports nothing of the daemon; it could ship as its own distribution.

Settings precedence: per call (``request_timeout=``) > client (``Sandbox.create(base_url=, api_key=)``) >
environment (``BRANCHBOX_URL``, ``BRANCHBOX_API_KEY``, ``BRANCHBOX_REQUEST_TIMEOUT``) > defaults
(``http://127.0.0.1:7077``, no key, 60 s).

Warm pools are daemon-wide, so their helpers are static like ``Sandbox.list``: ``Sandbox.pools()`` (statistics
of every pool), ``Sandbox.get_pool(template)``, ``Sandbox.configure_pool(template, min_size=..., ...)`` (create
or replace, live) and ``Sandbox.remove_pool(template)``; ``AsyncSandbox`` has the same, awaited. Each takes
``backend=`` for the pool on a backend other than the daemon's default (a template has one pool per backend).

Snapshots and forks: ``sbx.create_snapshot(name=)``, ``Sandbox.create(snapshot=)`` (restore),
``sbx.fork(count=)`` (one Sandbox or exception per child), ``sbx.reset(snapshot=None)``,
``Sandbox.snapshots()``/``get_snapshot()``/``delete_snapshot()``, and ``explore(sbx, cmds)`` (one fork per
command, run in parallel, results in order; ``aexplore`` for AsyncSandbox).

Network: ``Sandbox.create(allow_internet_access=, network={"allow_out": [...], "deny_out": [...]})``,
``sbx.update_network({...})`` (live), ``sbx.get_network()`` and ``sbx.get_host(port)`` (a daemon URL that reaches
that port inside the sandbox, HTTP and WebSocket).
Git workspaces: ``Workspace.create(repo, branch=...)`` (``AsyncWorkspace``) gives a sandbox with the repository
checked out from the daemon's cache (``ws.sandbox``, ``ws.path``, ``ws.commit``, ``ws.delete()``);
``sbx.git.clone(url, path)`` runs ``git clone`` inside an existing sandbox.
"""

from branchbox.sdk._async import AsyncSandbox, AsyncTemplate
from branchbox.sdk._async_commands import AsyncCommandHandle
from branchbox.sdk._config import DEFAULT_URL, ConnectionConfig
from branchbox.sdk._errors import (
    ERROR_TABLE,
    AgentError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError_,
    DiskFullError,
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
from branchbox.sdk._explore import aexplore, explore
from branchbox.sdk._models import (
    ArchiveInfo,
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    NetworkInfo,
    PoolInfo,
    PoolSettings,
    ProcessInfo,
    SandboxInfo,
    SnapshotInfo,
    TemplateInfo,
)
from branchbox.sdk._pty import AsyncPtyHandle, PtyHandle
from branchbox.sdk._sync import Sandbox, Template
from branchbox.sdk._sync_commands import CommandHandle
from branchbox.sdk._workspace import AsyncWorkspace, Workspace
from branchbox.sdk._workspaces import WorkspaceInfo

__all__ = [
    "DEFAULT_URL",
    "ERROR_TABLE",
    "AgentError",
    "ArchiveInfo",
    "AsyncCommandHandle",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "AsyncTemplate",
    "AsyncWorkspace",
    "AuthenticationError",
    "BadRequestError",
    "CommandHandle",
    "CommandResult",
    "ConflictError",
    "ConnectionConfig",
    "ConnectionError_",
    "DiskFullError",
    "EntryInfo",
    "FileNotFoundError_",
    "FilesystemEvent",
    "InvalidStateError",
    "NetworkInfo",
    "NotFoundError",
    "NotSupportedError",
    "PermissionDeniedError",
    "PoolInfo",
    "PoolSettings",
    "ProcessInfo",
    "ProcessNotFoundError",
    "PtyHandle",
    "RateLimitError",
    "Sandbox",
    "SandboxError",
    "SandboxInfo",
    "SandboxNotFoundError",
    "ServerError",
    "SnapshotInfo",
    "Template",
    "TemplateInfo",
    "TemplateNotFoundError",
    "TimeoutException",
    "Workspace",
    "WorkspaceInfo",
    "aexplore",
    "error_for",
    "explore",
]
