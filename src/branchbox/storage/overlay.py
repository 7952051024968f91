"""Per-sandbox directories on the host: overlay ``upper`` and ``work`` (owned by the sandbox's root), ``run``;
and the ``overlay`` storage driver (any filesystem: snapshot layers are copies of uppers).

``run`` holds the agent socket and backend bookkeeping; it is host-root only and never visible inside.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.errors import NotSupportedError
from branchbox.storage.base import NO_DISK_LIMITS, LayerInfo, SandboxDirs
from branchbox.storage.flatten import flatten_into
from branchbox.storage.fsutil import copy_tree, disk_usage, fsync_dir, syncfs


def prepare_sandbox_dirs(sandbox_dir: Path, idmap: IdMap) -> tuple[Path, Path, Path]:
    """Create ``sandbox_dir/{upper,work,run}``; return ``(upper, work, run)``. Idempotent."""
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(sandbox_dir, 0o711)  # noqa: S103 - no listing; upper/work inside belong to the sandbox uid
    upper, work, run = sandbox_dir / "upper", sandbox_dir / "work", sandbox_dir / "run"
    for d in (upper, work):
        d.mkdir(exist_ok=True)
        os.chown(d, idmap.host_base, idmap.host_base)
        os.chmod(d, 0o755)  # noqa: S103 - the overlay root directory mode
    run.mkdir(exist_ok=True)
    os.chown(run, 0, 0)
    os.chmod(run, 0o700)
    return upper, work, run


def remove_sandbox_dirs(sandbox_dir: Path) -> None:
    """Remove a sandbox's directories, whatever state a half-made tree is in. Missing is fine."""

    def onerror(
        func: Callable[..., object], path: str, exc_info: tuple[type[BaseException], BaseException, object]
    ) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    if sandbox_dir.is_symlink():
        sandbox_dir.unlink()
        return
    shutil.rmtree(sandbox_dir, onerror=onerror)  # onexc only exists from 3.12


class OverlayDriver:
    """Works on any filesystem: a frozen layer is a full copy of the sandbox's upper (``cp -a``), then syncfs."""

    name = "overlay"
    clones_layers = False
    disk_limits: str | None = None  # a plain directory upper: nothing limits it (docs/snapshots.md)

    def set_disk_limit(self, sandbox_dir: Path, disk_mb: int) -> None:
        """Refused: core never asks (``disk_limits`` is None, and ``core.disk.resolve`` refuses ``disk_mb``
        first); an embedder who calls it gets the same stable error as the API's callers."""
        raise NotSupportedError(NO_DISK_LIMITS)

    def keep_free(self, reserve_bytes: int) -> tuple[int, int] | None:
        return None

    def prepare_sandbox(
        self, sandbox_dir: Path, idmap: IdMap, *, base: Path | None = None, disk_mb: int = 0
    ) -> SandboxDirs:
        upper, work, run = prepare_sandbox_dirs(sandbox_dir, idmap)
        if base is not None:
            os.rmdir(upper)
            copy_tree(base, upper)
        return SandboxDirs(upper, work, run)

    def upper_dir(self, sandbox_dir: Path) -> Path:
        return sandbox_dir / "upper"

    def layer_lower(self, layer: Path) -> Path:
        return layer

    def remove_sandbox(self, sandbox_dir: Path) -> None:
        remove_sandbox_dirs(sandbox_dir)

    def freeze_upper(self, upper: Path, dest: Path, *, durable: bool = True) -> LayerInfo:
        tmp = dest.with_name(dest.name + ".tmp")
        remove_sandbox_dirs(tmp)
        try:
            copy_tree(upper, tmp)
            os.chmod(tmp, os.stat(upper).st_mode & 0o7777)
            if durable:  # syncfs writes back every dirty page of the filesystem: seconds on a busy disk
                syncfs(tmp)
            os.rename(tmp, dest)
        except BaseException:
            remove_sandbox_dirs(tmp)
            raise
        if durable:
            fsync_dir(dest.parent)
        return LayerInfo(path=dest)

    def remove_layer(self, path: Path) -> None:
        remove_sandbox_dirs(path)

    def flatten(self, layers: Sequence[Path], dest: Path) -> LayerInfo:
        tmp = dest.with_name(dest.name + ".tmp")
        remove_sandbox_dirs(tmp)
        try:
            flatten_into(layers, tmp)
            syncfs(tmp)
            os.rename(tmp, dest)
        except BaseException:
            remove_sandbox_dirs(tmp)
            raise
        fsync_dir(dest.parent)
        return disk_usage(dest)

    def disk_usage(self, path: Path) -> LayerInfo:
        return disk_usage(path)
