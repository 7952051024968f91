"""Git workspaces in the SDK: ``Workspace.create(repo, branch=...)`` / ``AsyncWorkspace`` (a sandbox with the
repository checked out, from the daemon's cache), and ``sbx.git.clone(...)`` (a ``git clone`` run inside an
existing sandbox through the agent; the sandbox needs network access to the server)."""

from __future__ import annotations

import base64
import shlex
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from branchbox.sdk._config import UNSET, _Unset
from branchbox.sdk._models import CommandResult, _dt
from branchbox.sdk._requests import Req, _drop_none

if TYPE_CHECKING:
    from branchbox.sdk._async import AsyncSandbox
    from branchbox.sdk._sync import Sandbox

Timeout = float | None | _Unset


class _WorkspaceView:
    """What :class:`Workspace` and :class:`AsyncWorkspace` both show of a workspace."""

    _info: WorkspaceInfo

    @property
    def info(self) -> WorkspaceInfo:
        return self._info

    @property
    def workspace_id(self) -> str:
        return self._info.workspace_id

    @property
    def path(self) -> str:
        return self._info.path

    @property
    def commit(self) -> str | None:
        return self._info.commit


@dataclass(frozen=True, slots=True)
class WorkspaceInfo:
    workspace_id: str
    status: str  # creating | ready | error
    sandbox_id: str | None
    repository_url: str
    branch: str | None
    commit: str | None
    path: str
    template: str
    created_at: datetime
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WorkspaceInfo:
        created = _dt(d["created_at"])
        assert created is not None
        return cls(
            workspace_id=d["id"], status=d["status"], sandbox_id=d.get("sandbox_id"),
            repository_url=d["repository_url"], branch=d.get("branch"), commit=d.get("commit"), path=d["path"],
            template=d.get("template", ""), created_at=created, cached=bool(d.get("cached")),
            timings={k: float(v) for k, v in (d.get("timings") or {}).items()}, error=d.get("error"),
        )  # fmt: skip


def _ws(workspace_id: str) -> str:
    if not workspace_id:
        raise ValueError("workspace_id must not be empty")
    return "/v1/workspaces/" + quote(workspace_id, safe="")


def create_workspace(
    repository_url: str, *, branch: str | None, commit: str | None, template: str, depth: int | None,
    path: str | None, token: str | None, timeout: float | None, metadata: Mapping[str, str] | None,
    envs: Mapping[str, str] | None, wait: bool,
) -> Req:  # fmt: skip
    body = _drop_none({
        "repository_url": repository_url, "branch": branch, "commit": commit, "template": template, "depth": depth,
        "path": path, "token": token, "timeout": timeout, "metadata": dict(metadata) if metadata else None,
        "envs": dict(envs) if envs else None, "wait": None if wait else False,
    })  # fmt: skip
    return Req("POST", "/v1/workspaces", json=body, use_default_timeout=False, timeout=None)


def get_workspace(workspace_id: str) -> Req:
    return Req("GET", _ws(workspace_id))


def list_workspaces() -> Req:
    return Req("GET", "/v1/workspaces")


def delete_workspace(workspace_id: str) -> Req:
    return Req("DELETE", _ws(workspace_id))


def clone_command(
    url: str, path: str | None, *, branch: str | None, depth: int | None, token: str | None
) -> tuple[list[str], dict[str, str]]:
    """argv + env of a ``git clone`` inside a sandbox. Credentials (URL userinfo or ``token``) travel as an
    ``http.extraHeader`` in the process's environment, never in the clone's config or on its command line."""
    parts = urllib.parse.urlsplit(url)
    env: dict[str, str] = {"GIT_TERMINAL_PROMPT": "0"}
    if parts.scheme in ("http", "https") and (parts.username or parts.password or token):
        user = urllib.parse.unquote(parts.username or "x-access-token")
        secret = token if token is not None else urllib.parse.unquote(parts.password or "")
        cred = base64.b64encode(f"{user}:{secret}".encode()).decode()
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {cred}"})  # fmt: skip
        host = parts.hostname or ""
        url = urllib.parse.urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path,
                                       parts.query, parts.fragment))  # fmt: skip
    argv = ["git", "clone", "-q"]
    if branch is not None:
        argv += ["--branch", branch]
    if depth is not None:
        argv += [f"--depth={int(depth)}"]
    argv += ["--", url]
    if path is not None:
        argv.append(path)
    return argv, env


class Git:
    """``sbx.git``: git inside a sandbox (runs through the agent)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def clone(
        self, url: str, path: str | None = None, *, branch: str | None = None, depth: int | None = None,
        token: str | None = None, cwd: str | None = None, timeout: float | None = 600,
    ) -> CommandResult:  # fmt: skip
        """``git clone`` inside the sandbox (it needs network access to the server). Raises on failure."""
        argv, env = clone_command(url, path, branch=branch, depth=depth, token=token)
        return self._sbx.commands.run(shlex.join(argv), envs=env, cwd=cwd, timeout=timeout)


class AsyncGit:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sbx = sandbox

    async def clone(
        self, url: str, path: str | None = None, *, branch: str | None = None, depth: int | None = None,
        token: str | None = None, cwd: str | None = None, timeout: float | None = 600,
    ) -> CommandResult:  # fmt: skip
        argv, env = clone_command(url, path, branch=branch, depth=depth, token=token)
        return await self._sbx.commands.run(shlex.join(argv), envs=env, cwd=cwd, timeout=timeout)


class Workspace(_WorkspaceView):
    """A sandbox with a git repository checked out, from the daemon's cache. ``workspace.sandbox`` runs
    commands in it; ``with Workspace.create(...) as ws:`` deletes it at the end of the block."""

    def __init__(self, info: WorkspaceInfo, *, base_url: str | None, api_key: str | None) -> None:
        self._info = info
        self._base_url, self._api_key = base_url, api_key
        self._sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        from branchbox.sdk._sync import Sandbox  # noqa: PLC0415 - _sync imports this module

        if self._sandbox is None:
            if self._info.sandbox_id is None:
                raise RuntimeError(f"workspace {self.workspace_id} has no sandbox (status {self._info.status})")
            self._sandbox = Sandbox.connect(self._info.sandbox_id, base_url=self._base_url, api_key=self._api_key)
        return self._sandbox

    @classmethod
    def create(
        cls, repository_url: str, *, branch: str | None = None, commit: str | None = None,
        template: str = "default", depth: int | None = None, path: str | None = None, token: str | None = None,
        timeout: float | None = None, metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None, wait: bool = True, base_url: str | None = None,
        api_key: str | None = None, request_timeout: Timeout = UNSET,
    ) -> Workspace:  # fmt: skip
        """Check out ``branch`` (default: the server's default branch) or ``commit`` of ``repository_url``."""
        from branchbox.sdk._sync import _oneshot  # noqa: PLC0415

        req = create_workspace(
            repository_url, branch=branch, commit=commit, template=template, depth=depth, path=path, token=token,
            timeout=timeout, metadata=metadata, envs=envs, wait=wait,
        )  # fmt: skip
        info = WorkspaceInfo.from_json(
            _oneshot(req, base_url=base_url, api_key=api_key, request_timeout=request_timeout).json()
        )
        return cls(info, base_url=base_url, api_key=api_key)

    @classmethod
    def get(cls, workspace_id: str, *, base_url: str | None = None, api_key: str | None = None) -> Workspace:
        from branchbox.sdk._sync import _oneshot  # noqa: PLC0415

        resp = _oneshot(get_workspace(workspace_id), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return cls(WorkspaceInfo.from_json(resp.json()), base_url=base_url, api_key=api_key)

    @staticmethod
    def list(*, base_url: str | None = None, api_key: str | None = None) -> list[WorkspaceInfo]:
        from branchbox.sdk._sync import _oneshot  # noqa: PLC0415

        resp = _oneshot(list_workspaces(), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return [WorkspaceInfo.from_json(d) for d in resp.json()]

    def refresh(self) -> WorkspaceInfo:
        self._info = Workspace.get(self.workspace_id, base_url=self._base_url, api_key=self._api_key).info
        return self._info

    def delete(self) -> None:
        """Destroy the workspace's sandbox (the daemon keeps the cached commit for the next request)."""
        if self._sandbox is not None:
            self._sandbox.close()
        Workspace.remove(self.workspace_id, base_url=self._base_url, api_key=self._api_key)

    @staticmethod
    def remove(workspace_id: str, *, base_url: str | None = None, api_key: str | None = None) -> None:
        """Delete the workspace ``workspace_id``."""
        from branchbox.sdk._sync import _oneshot  # noqa: PLC0415

        _oneshot(delete_workspace(workspace_id), base_url=base_url, api_key=api_key, request_timeout=UNSET)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


class AsyncWorkspace(_WorkspaceView):
    """:class:`Workspace`, async: ``ws = await AsyncWorkspace.create(repo, branch="main")``."""

    def __init__(self, info: WorkspaceInfo, *, base_url: str | None, api_key: str | None) -> None:
        self._info = info
        self._base_url, self._api_key = base_url, api_key
        self._sandbox: AsyncSandbox | None = None

    async def sandbox(self) -> AsyncSandbox:
        from branchbox.sdk._async import AsyncSandbox  # noqa: PLC0415

        if self._sandbox is None:
            if self._info.sandbox_id is None:
                raise RuntimeError(f"workspace {self.workspace_id} has no sandbox (status {self._info.status})")
            self._sandbox = await AsyncSandbox.connect(
                self._info.sandbox_id, base_url=self._base_url, api_key=self._api_key
            )
        return self._sandbox

    @classmethod
    async def create(
        cls, repository_url: str, *, branch: str | None = None, commit: str | None = None,
        template: str = "default", depth: int | None = None, path: str | None = None, token: str | None = None,
        timeout: float | None = None, metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None, wait: bool = True, base_url: str | None = None,
        api_key: str | None = None, request_timeout: Timeout = UNSET,
    ) -> AsyncWorkspace:  # fmt: skip
        from branchbox.sdk._async import _oneshot  # noqa: PLC0415

        req = create_workspace(
            repository_url, branch=branch, commit=commit, template=template, depth=depth, path=path, token=token,
            timeout=timeout, metadata=metadata, envs=envs, wait=wait,
        )  # fmt: skip
        resp = await _oneshot(req, base_url=base_url, api_key=api_key, request_timeout=request_timeout)
        return cls(WorkspaceInfo.from_json(resp.json()), base_url=base_url, api_key=api_key)

    @classmethod
    async def get(cls, workspace_id: str, *, base_url: str | None = None, api_key: str | None = None) -> AsyncWorkspace:
        from branchbox.sdk._async import _oneshot  # noqa: PLC0415

        resp = await _oneshot(get_workspace(workspace_id), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return cls(WorkspaceInfo.from_json(resp.json()), base_url=base_url, api_key=api_key)

    @staticmethod
    async def list(*, base_url: str | None = None, api_key: str | None = None) -> list[WorkspaceInfo]:
        from branchbox.sdk._async import _oneshot  # noqa: PLC0415

        resp = await _oneshot(list_workspaces(), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return [WorkspaceInfo.from_json(d) for d in resp.json()]

    async def delete(self) -> None:
        from branchbox.sdk._async import _oneshot  # noqa: PLC0415

        if self._sandbox is not None:
            await self._sandbox.close()
        await _oneshot(
            delete_workspace(self.workspace_id), base_url=self._base_url, api_key=self._api_key, request_timeout=UNSET
        )

    async def __aenter__(self) -> AsyncWorkspace:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()
