"""Git workspaces in the SDK, the part without I/O: what a workspace is (:class:`WorkspaceInfo`), the requests,
and the argv of a ``git clone`` inside a sandbox. ``Workspace``/``AsyncWorkspace`` are in ``_workspace.py``;
``sbx.git`` (``AsyncGit``, and the generated ``Git``) is in ``_async_commands.py``."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from branchbox.sdk._config import _Unset
from branchbox.sdk._models import _dt
from branchbox.sdk._requests import Req, _drop_none

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
    envs: Mapping[str, str] | None, wait: bool, ssh_key: str | None = None, known_hosts: str | None = None,
) -> Req:  # fmt: skip
    body = _drop_none({
        "repository_url": repository_url, "branch": branch, "commit": commit, "template": template, "depth": depth,
        "path": path, "token": token, "ssh_key": ssh_key, "known_hosts": known_hosts, "timeout": timeout,
        "metadata": dict(metadata) if metadata else None,
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
