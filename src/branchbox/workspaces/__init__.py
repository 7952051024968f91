"""Git workspaces: sandboxes with a repository checked out, from a cache of mirrors and commit layers.

See docs/workspaces.md. A :class:`WorkspaceService` added to a Manager
(``manager.add_service(WorkspaceService(manager))``) runs the commands."""

from branchbox.workspaces.models import WorkspaceInfo, WorkspaceStatus
from branchbox.workspaces.service import WorkspaceService
from branchbox.workspaces.urls import RepoUrl, parse_repo_url

__all__ = ["RepoUrl", "WorkspaceInfo", "WorkspaceService", "WorkspaceStatus", "parse_repo_url"]
