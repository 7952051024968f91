"""``branchbox storage prepare``: copy-on-write storage for a fresh data dir (see branchbox.storage.prepare)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from branchbox.core.settings import DEFAULT_DATA_DIR
from branchbox.errors import BranchboxError

err = Console(stderr=True)


@click.group()
def storage() -> None:
    """Storage of the data dir (local, no daemon needed)."""


@storage.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Default: $BRANCHBOX_DATA_DIR.")
@click.option("--size-gb", type=int, default=None, help="Size of a new image (default: half the free space).")
def prepare(data_dir: Path | None, size_gb: int | None) -> None:
    """Give a fresh data dir its own btrfs filesystem (O(1) snapshots and forks); mount it again after a reboot.

    A data dir that already holds data, or is on btrfs, is left as it is."""
    from branchbox.storage.prepare import prepare as do_prepare  # noqa: PLC0415 - keeps `branchbox --help` fast

    target = data_dir or Path(os.environ.get("BRANCHBOX_DATA_DIR") or DEFAULT_DATA_DIR)
    try:
        done = do_prepare(target, size_gb=size_gb)
    except BranchboxError as exc:
        err.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False)
        sys.exit(1)
    err.print(f"storage: {done.action}: {done.message}", highlight=False, markup=False)
