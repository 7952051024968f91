"""What the workspaces service needs of the core: a narrow interface (``Manager`` satisfies it), so the service
depends on these ten members, not on the Manager class (docs/architecture.md, "Layers")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from branchbox.core.settings import ManagerSettings
from branchbox.images.store import TemplateStore
from branchbox.models import SandboxInfo


class WorkspaceHost(Protocol):
    """Layers, sandboxes on layers, and the settings the git cache lives by."""

    @property
    def settings(self) -> ManagerSettings: ...

    @property
    def templates(self) -> TemplateStore: ...

    @property
    def storage_driver(self) -> str: ...

    def layer_path(self, layer_id: str) -> Path: ...

    def lower_path(self, layer_id: str) -> Path: ...

    def add_pinned_layer(self, layer_id: str, owner: str, *, below: Sequence[str] = ()) -> None: ...

    def unpin_layers(self, owner: str) -> None: ...

    def drop_spares(self, layer_id: str) -> None: ...

    async def create_on_layers(
        self,
        layers: Sequence[str],
        *,
        template: str = ...,
        source: str = ...,
        env: Mapping[str, str] | None = ...,
        timeout: float | None = ...,
        cpu: float = ...,
        memory_mb: int = ...,
        pids: int = ...,
        metadata: Mapping[str, str] | None = ...,
        warm: bool = ...,
        warm_up: Sequence[str] = ...,
    ) -> SandboxInfo: ...

    async def destroy(self, sandbox_id: str) -> None: ...
