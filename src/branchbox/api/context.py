"""What every route needs, kept on ``app.state.ctx`` (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import structlog
from fastapi import Depends
from starlette.requests import HTTPConnection

from branchbox.api.auth import ApiKeyChecker, PortTokens
from branchbox.api.metrics import Metrics
from branchbox.api.settings import ApiSettings
from branchbox.errors import NotSupportedError

if TYPE_CHECKING:
    from branchbox.core.manager import Manager
    from branchbox.workspaces.service import WorkspaceService


@dataclass(slots=True)
class AppContext:
    manager: Manager
    settings: ApiSettings
    metrics: Metrics
    checker: ApiKeyChecker
    log: structlog.typing.FilteringBoundLogger
    port_tokens: PortTokens = field(default_factory=PortTokens)
    workspaces: WorkspaceService | None = None  # added to ``manager`` (create_app(..., workspaces=))

    def workspace_service(self) -> WorkspaceService:
        """The workspace service, or ``not_supported`` for an app made without one."""
        if self.workspaces is None:
            raise NotSupportedError(
                "this server has no git workspaces: its app was made without a workspace service "
                "(create_app(manager, workspaces=manager.add_service(WorkspaceService(manager))))"
            )
        return self.workspaces


def get_ctx(conn: HTTPConnection) -> AppContext:
    ctx: AppContext = conn.app.state.ctx
    return ctx


async def _ctx(conn: HTTPConnection) -> AppContext:
    """Route dependency. Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` ones in a thread
    pool, a thread hop per dependency per request."""
    return get_ctx(conn)


async def require_api_key(conn: HTTPConnection) -> None:
    """Route dependency: checks ``Authorization: Bearer`` (HTTP and WebSocket alike)."""
    get_ctx(conn).checker.check(conn.headers.get("authorization"))


async def bind_sandbox(sandbox_id: str) -> str:
    """Path dependency: binds sandbox_id into the structured log context of this request."""
    structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
    return sandbox_id


Ctx = Annotated[AppContext, Depends(_ctx)]
SandboxId = Annotated[str, Depends(bind_sandbox)]
