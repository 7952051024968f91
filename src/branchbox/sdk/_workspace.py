"""Git workspaces in the SDK: ``Workspace.create(repo, branch=...)`` / ``AsyncWorkspace`` (a sandbox with the
repository checked out, from the daemon's cache). Hand-written pair: ``Workspace.sandbox`` is a property,
``AsyncWorkspace.sandbox()`` a coroutine (it may connect)."""

from __future__ import annotations

from collections.abc import Mapping

from branchbox.sdk._async import AsyncSandbox
from branchbox.sdk._async_http import _oneshot as _aoneshot
from branchbox.sdk._config import UNSET
from branchbox.sdk._sync import Sandbox
from branchbox.sdk._sync_http import _oneshot
from branchbox.sdk._workspaces import (
    Timeout,
    WorkspaceInfo,
    _WorkspaceView,
    create_workspace,
    delete_workspace,
    get_workspace,
    list_workspaces,
)


class Workspace(_WorkspaceView):
    """A sandbox with a git repository checked out, from the daemon's cache. ``workspace.sandbox`` runs
    commands in it; ``with Workspace.create(...) as ws:`` deletes it at the end of the block."""

    def __init__(self, info: WorkspaceInfo, *, base_url: str | None, api_key: str | None) -> None:
        self._info = info
        self._base_url, self._api_key = base_url, api_key
        self._sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            if self._info.sandbox_id is None:
                raise RuntimeError(f"workspace {self.workspace_id} has no sandbox (status {self._info.status})")
            self._sandbox = Sandbox.connect(self._info.sandbox_id, base_url=self._base_url, api_key=self._api_key)
        return self._sandbox

    @classmethod
    def create(
        cls, repository_url: str, *, branch: str | None = None, commit: str | None = None,
        template: str = "default", depth: int | None = None, path: str | None = None, token: str | None = None,
        ssh_key: str | None = None, known_hosts: str | None = None, timeout: float | None = None,
        metadata: Mapping[str, str] | None = None, envs: Mapping[str, str] | None = None, wait: bool = True,
        base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET,
    ) -> Workspace:  # fmt: skip
        """Check out ``branch`` (default: the server's default branch) or ``commit`` of ``repository_url``.

        ``token``: for an http(s) server. ``ssh_key``: the text of a private key (no passphrase) for an ssh
        repository (``ssh://git@host/org/repo.git`` or ``git@host:org/repo.git``); ``known_hosts``: the server's
        host keys (``ssh-keyscan`` lines), checked strictly when given. The daemon keeps neither."""
        req = create_workspace(
            repository_url, branch=branch, commit=commit, template=template, depth=depth, path=path, token=token,
            timeout=timeout, metadata=metadata, envs=envs, wait=wait, ssh_key=ssh_key, known_hosts=known_hosts,
        )  # fmt: skip
        info = WorkspaceInfo.from_json(
            _oneshot(req, base_url=base_url, api_key=api_key, request_timeout=request_timeout).json()
        )
        return cls(info, base_url=base_url, api_key=api_key)

    @classmethod
    def get(cls, workspace_id: str, *, base_url: str | None = None, api_key: str | None = None) -> Workspace:
        resp = _oneshot(get_workspace(workspace_id), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return cls(WorkspaceInfo.from_json(resp.json()), base_url=base_url, api_key=api_key)

    @staticmethod
    def list(*, base_url: str | None = None, api_key: str | None = None) -> list[WorkspaceInfo]:
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
        ssh_key: str | None = None, known_hosts: str | None = None, timeout: float | None = None,
        metadata: Mapping[str, str] | None = None, envs: Mapping[str, str] | None = None, wait: bool = True,
        base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET,
    ) -> AsyncWorkspace:  # fmt: skip
        req = create_workspace(
            repository_url, branch=branch, commit=commit, template=template, depth=depth, path=path, token=token,
            timeout=timeout, metadata=metadata, envs=envs, wait=wait, ssh_key=ssh_key, known_hosts=known_hosts,
        )  # fmt: skip
        resp = await _aoneshot(req, base_url=base_url, api_key=api_key, request_timeout=request_timeout)
        return cls(WorkspaceInfo.from_json(resp.json()), base_url=base_url, api_key=api_key)

    @classmethod
    async def get(cls, workspace_id: str, *, base_url: str | None = None, api_key: str | None = None) -> AsyncWorkspace:
        resp = await _aoneshot(get_workspace(workspace_id), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return cls(WorkspaceInfo.from_json(resp.json()), base_url=base_url, api_key=api_key)

    @staticmethod
    async def list(*, base_url: str | None = None, api_key: str | None = None) -> list[WorkspaceInfo]:
        resp = await _aoneshot(list_workspaces(), base_url=base_url, api_key=api_key, request_timeout=UNSET)
        return [WorkspaceInfo.from_json(d) for d in resp.json()]

    async def refresh(self) -> WorkspaceInfo:
        self._info = (await AsyncWorkspace.get(self.workspace_id, base_url=self._base_url, api_key=self._api_key)).info
        return self._info

    async def delete(self) -> None:
        """Destroy the workspace's sandbox (the daemon keeps the cached commit for the next request)."""
        if self._sandbox is not None:
            await self._sandbox.close()
        await AsyncWorkspace.remove(self.workspace_id, base_url=self._base_url, api_key=self._api_key)

    @staticmethod
    async def remove(workspace_id: str, *, base_url: str | None = None, api_key: str | None = None) -> None:
        """Delete the workspace ``workspace_id``."""
        await _aoneshot(delete_workspace(workspace_id), base_url=base_url, api_key=api_key, request_timeout=UNSET)

    async def __aenter__(self) -> AsyncWorkspace:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()
