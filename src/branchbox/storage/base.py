"""The storage driver protocol: per-sandbox writable layers, immutable snapshot layers, flattening, disk usage.

A sandbox's root filesystem is an overlay: ``lowers`` (immutable layers, topmost first, the template last) plus a
writable ``upper``. A snapshot freezes a sandbox's upper into a new immutable layer; restores stack a fresh upper
on the snapshot's chain of layers. Overlay whiteouts (char 0/0 devices) and opaque directories (the
``user.overlay.opaque`` xattr: mounts use ``userxattr``) are kept in layers as the overlay wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from branchbox.backends.base import IdMap, LayerInfo

# what a caller who asked for disk_mb hears where the storage driver cannot limit a sandbox's disk
NO_DISK_LIMITS = (
    "disk_mb needs a data dir on btrfs (the overlay storage driver cannot limit a sandbox's disk): leave it out, or "
    "move the data dir to btrfs (`branchbox storage prepare` on a fresh data dir)"
)

__all__ = ["LayerInfo", "SandboxDirs", "StorageDriver"]  # LayerInfo: defined with the backends (a layer boots them)


@dataclass(frozen=True, slots=True)
class SandboxDirs:
    upper: Path
    work: Path
    run: Path


class StorageDriver(Protocol):
    """Where layers live and how they are made. Methods are synchronous (run them in a thread)."""

    name: str
    clones_layers: bool  # True: a restore clones the top layer as the new upper in O(1) (btrfs snapshots)
    disk_limits: str | None  # how set_disk_limit enforces a limit ("btrfs squota", ...); None: it cannot

    def prepare_sandbox(
        self, sandbox_dir: Path, idmap: IdMap, *, base: Path | None = None, disk_mb: int = 0
    ) -> SandboxDirs:
        """Create ``sandbox_dir/{upper,work,run}``. ``base``: a layer whose content the upper starts with;
        ``disk_mb``: what the upper may hold (0: no limit), where ``disk_limits`` is set."""

    def set_disk_limit(self, sandbox_dir: Path, disk_mb: int) -> None:
        """Change the limit of a prepared sandbox's upper to ``disk_mb`` MiB (0: no limit); writes past it fail
        with EDQUOT inside. Only called when ``disk_limits`` is set. Cheap: no transaction commit."""

    def keep_free(self, reserve_bytes: int) -> tuple[int, int] | None:
        """Limit this daemon's sandboxes together so that ``reserve_bytes`` stay free on the filesystem (0: no
        limit); return (bytes they hold, their limit), or None when the driver cannot. Called off the hot path."""

    def upper_dir(self, sandbox_dir: Path) -> Path:
        """Where ``prepare_sandbox`` put the sandbox's upper."""

    def layer_lower(self, layer: Path) -> Path:
        """The directory of layer ``layer`` (as made by freeze_upper/flatten) to mount as an overlay lower."""

    def remove_sandbox(self, sandbox_dir: Path) -> None:
        """Remove a sandbox's directories whatever state they are in. Missing is fine."""

    def freeze_upper(self, upper: Path, dest: Path, *, durable: bool = True) -> LayerInfo:
        """Make an immutable layer at ``dest`` from ``upper`` (the sandbox is frozen meanwhile). With ``durable``
        it is on disk on return; without (a fork's throw-away layer: its children die with the host anyway) the
        OS writes it back when it likes."""

    def remove_layer(self, path: Path) -> None:
        """Remove a layer. Missing is fine."""

    def flatten(self, layers: Sequence[Path], dest: Path) -> LayerInfo:
        """Merge lower dirs ``layers`` (topmost first) into one layer at ``dest`` that looks the same over any
        lower."""

    def disk_usage(self, path: Path) -> LayerInfo:
        """Allocated bytes and number of entries under ``path`` (hard links counted once)."""
