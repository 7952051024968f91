"""Workspace records as the core returns them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class WorkspaceStatus(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class WorkspaceInfo:
    """A sandbox with a repository checked out at ``commit`` under ``path``.

    ``repository_url`` never holds credentials. ``timings`` (ms): ``resolve`` (asking the server where a branch
    points), ``fetch``, ``checkout``, ``layer`` (sealing the commit layer), ``sandbox`` (booting on it), ``total``.
    ``cached``: the commit layer existed already (no fetch, no checkout)."""

    id: str
    status: WorkspaceStatus
    repository_url: str
    branch: str | None
    commit: str | None
    path: str
    template: str
    created_at: float
    sandbox_id: str | None = None
    cached: bool = False
    timings: Mapping[str, float] = field(default_factory=dict)
    error: Mapping[str, str] | None = None  # {"code", "message"} when status is error
