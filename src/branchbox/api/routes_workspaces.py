"""Git workspaces: ``/v1/workspaces`` and the seed's ``POST /api/v1/agent/workspaces``. See docs/workspaces.md.

Credentials: put them in ``repository_url`` (``https://user:token@host/...``), or send the token in the body's
``token`` field or the ``X-Git-Token`` header; for ssh repositories, an ``ssh_key`` (and ``known_hosts``) in the
body. Either way they reach git only; responses and records hold the credential-free URL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from branchbox.api.context import Ctx
from branchbox.api.responses import json_response
from branchbox.api.schemas import MAX_TIMEOUT_S, EnvMap, ErrorBody, MetadataMap
from branchbox.workspaces.models import WorkspaceInfo, WorkspaceStatus
from branchbox.workspaces.sshauth import MAX_KNOWN_HOSTS_CHARS, MAX_SSH_KEY_CHARS

router = APIRouter(tags=["workspaces"])
WorkspaceId = Annotated[str, Path(min_length=1, max_length=64, description="Workspace id (ws-...).")]
GitToken = Annotated[
    str | None,
    Header(alias="X-Git-Token", max_length=4096, description="Token for an http(s) git server (never stored)."),
]
Url = Annotated[str, Field(min_length=1, max_length=2048, description="https, http, git or ssh URL of the repository.")]


class CreateWorkspaceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository_url: Url
    branch: Annotated[str | None, Field(min_length=1, max_length=255)] = Field(
        default=None, description="Branch to check out (asked from the server on every request)."
    )
    commit: Annotated[str | None, Field(min_length=4, max_length=64)] = Field(
        default=None, description="Commit id to check out (detached HEAD); cached commits need no server."
    )
    template: Annotated[str, Field(min_length=1, max_length=255)] = "default"
    depth: Annotated[int | None, Field(ge=1, le=1_000_000)] = Field(
        default=None, description="Depth of the first fetch of a repository the cache has never seen (default 1)."
    )
    path: Annotated[str | None, Field(min_length=2, max_length=1024)] = Field(
        default=None, description="Where the checkout goes in the sandbox (default /workspace/<repository name>)."
    )
    timeout: Annotated[float | None, Field(gt=0, le=MAX_TIMEOUT_S)] = None
    envs: EnvMap | None = None
    metadata: MetadataMap | None = None
    wait: bool = Field(default=True, description="false: return at once with status creating; poll GET.")
    token: Annotated[str | None, Field(min_length=1, max_length=4096)] = Field(
        default=None, description="Token for an http(s) git server (or the X-Git-Token header); never stored."
    )
    ssh_key: Annotated[str | None, Field(min_length=1, max_length=MAX_SSH_KEY_CHARS)] = Field(
        default=None,
        description="Private key (OpenSSH or PEM text, no passphrase) for an ssh repository: offered to that server "
        "only, as a file that exists while one git process runs; never stored or echoed.",
    )
    known_hosts: Annotated[str | None, Field(min_length=1, max_length=MAX_KNOWN_HOSTS_CHARS)] = Field(
        default=None,
        description="The ssh server's host keys (known_hosts lines, as `ssh-keyscan -p PORT HOST` prints them): "
        "checked strictly. Without it the host key of an ssh server is not checked.",
    )


class AgentWorkspaceRequest(BaseModel):
    """The seed document's body; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    repository_url: Url
    branch: Annotated[str | None, Field(min_length=1, max_length=255)] = None
    base_image: Annotated[str, Field(min_length=1, max_length=255)] = "default"


class WorkspaceResponse(BaseModel):
    id: str
    status: WorkspaceStatus
    sandbox_id: str | None
    repository_url: str = Field(description="Without credentials.")
    branch: str | None
    commit: str | None
    path: str
    template: str
    created_at: datetime
    cached: bool = Field(description="The commit layer existed: no fetch, no checkout.")
    timings: dict[str, float] = Field(description="Phases in ms: resolve, fetch, checkout, layer, sandbox, total.")
    error: ErrorBody | None = None

    @classmethod
    def of(cls, ws: WorkspaceInfo) -> WorkspaceResponse:
        return cls(
            id=ws.id, status=ws.status, sandbox_id=ws.sandbox_id, repository_url=ws.repository_url,
            branch=ws.branch, commit=ws.commit, path=ws.path, template=ws.template,
            created_at=datetime.fromtimestamp(ws.created_at, UTC), cached=ws.cached, timings=dict(ws.timings),
            error=ErrorBody(code=ws.error["code"], message=ws.error["message"]) if ws.error else None,
        )  # fmt: skip


@router.post(
    "/v1/workspaces",
    status_code=201,
    response_model=WorkspaceResponse,
    summary="Create a git workspace",
    description="A sandbox with the repository checked out at `branch` or `commit`. Repositories and commits "
    "seen before come from the cache (a commit layer): tens of milliseconds.",
)
async def create_workspace(body: CreateWorkspaceRequest, ctx: Ctx, x_git_token: GitToken = None) -> Response:
    ws = await ctx.workspace_service().create(
        body.repository_url, branch=body.branch, commit=body.commit, template=body.template, depth=body.depth,
        path=body.path, token=body.token or x_git_token, ssh_key=body.ssh_key, known_hosts=body.known_hosts,
        wait=body.wait, timeout=body.timeout, metadata=body.metadata,
        env=body.envs,
    )  # fmt: skip
    ctx.log.info("workspace.created", workspace_id=ws.id, status=ws.status.value, cached=ws.cached,
                 total_ms=ws.timings.get("total"))  # fmt: skip
    return json_response(WorkspaceResponse.of(ws), status_code=201)


@router.post("/api/v1/agent/workspaces", status_code=201, response_model=WorkspaceResponse, include_in_schema=False)
async def create_agent_workspace(body: AgentWorkspaceRequest, ctx: Ctx, x_git_token: GitToken = None) -> Response:
    """The seed's route: ``{repository_url, branch, base_image}`` (base_image = template)."""
    ws = await ctx.workspace_service().create(
        body.repository_url, branch=body.branch, template=body.base_image, token=x_git_token
    )
    return json_response(WorkspaceResponse.of(ws), status_code=201)


@router.get("/v1/workspaces", response_model=list[WorkspaceResponse], summary="List workspaces")
async def list_workspaces(ctx: Ctx) -> list[WorkspaceResponse]:
    return [WorkspaceResponse.of(w) for w in await ctx.workspace_service().list()]


@router.get("/v1/workspaces/{workspace_id}", response_model=WorkspaceResponse, summary="Get one workspace")
async def get_workspace(workspace_id: WorkspaceId, ctx: Ctx) -> Response:
    return json_response(WorkspaceResponse.of(await ctx.workspace_service().get(workspace_id)))


@router.delete(
    "/v1/workspaces/{workspace_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a workspace",
    description="Destroys its sandbox. The cached commit layer stays for the next request.",
)
async def delete_workspace(workspace_id: WorkspaceId, ctx: Ctx) -> Response:
    await ctx.workspace_service().delete(workspace_id)
    return Response(status_code=204)
