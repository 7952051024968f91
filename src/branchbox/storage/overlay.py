"""Per-sandbox directories on the host: overlay ``upper`` and ``work`` (owned by the sandbox's root), ``run``.

``run`` holds the agent socket and backend bookkeeping; it is host-root only and never visible inside.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from branchbox.backends.base import IdMap


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
