"""``branchbox snapshot create|ls|rm``, ``branchbox fork ID -n N``, ``branchbox restore SNAP``,
``branchbox reset ID [--snapshot SNAP]``: through the SDK."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Protocol

import click
from rich.console import Console
from rich.markup import escape

from branchbox.cli.tables import Listing
from branchbox.sdk import Sandbox, SandboxError, SnapshotInfo

out = Console()
err = Console(stderr=True)


class _Conn(Protocol):
    url: str | None
    api_key: str | None

    def connect(self, sandbox_id: str) -> Sandbox: ...


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB"):
        if v < 1024:
            return f"{v:.0f} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def snapshot_json(s: SnapshotInfo) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["created_at"] = s.created_at.isoformat()
    return d


@click.group()
def snapshot() -> None:
    """Snapshots: immutable captures of a sandbox's files (create, ls, rm)."""


@snapshot.command(name="create")
@click.argument("sandbox_id")
@click.option("-n", "--name", default=None, help="A unique name to restore it by.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def snapshot_create(conn: _Conn, sandbox_id: str, name: str | None, as_json: bool) -> None:
    """Snapshot a sandbox (it is frozen while its files are captured) and print the snapshot id."""
    sbx = conn.connect(sandbox_id)
    try:
        snap = sbx.create_snapshot(name=name)
    finally:
        sbx.close()
    if as_json:
        click.echo(json.dumps(snapshot_json(snap), indent=2))
    else:
        click.echo(snap.snapshot_id)


@snapshot.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def snapshot_ls(conn: _Conn, as_json: bool) -> None:
    """List snapshots."""
    snaps = Sandbox.snapshots(base_url=conn.url, api_key=conn.api_key)
    if as_json:
        click.echo(json.dumps([snapshot_json(s) for s in snaps], indent=2))
        return
    if not snaps:
        out.print("no snapshots: `branchbox snapshot create SANDBOX_ID` makes one", highlight=False)
        return
    table = Listing("SNAPSHOT", "NAME", "FROM", "TEMPLATE", "LAYERS", "SIZE", "CREATED",
                    keep=("SNAPSHOT", "FROM", "LAYERS", "SIZE", "CREATED"))  # fmt: skip
    for s in snaps:
        table.add(
            s.snapshot_id,
            s.name or "-",
            s.sandbox_id or "-",
            s.template_id,
            str(len(s.layers)),
            _size(s.size_bytes),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    table.print(out)


@snapshot.command(name="rm")
@click.argument("snapshots", nargs=-1, required=True)
@click.pass_obj
def snapshot_rm(conn: _Conn, snapshots: tuple[str, ...]) -> None:
    """Delete snapshots (by id or name); sandboxes made from them keep working."""
    failed = False
    for ref in snapshots:
        try:
            Sandbox.delete_snapshot(ref, base_url=conn.url, api_key=conn.api_key)
        except SandboxError as exc:
            err.print(f"[red]error[/red] {escape(ref)} ({exc.code}): {escape(exc.message)}", highlight=False)
            failed = True
    if failed:
        sys.exit(1)


@click.command()
@click.argument("sandbox_id")
@click.option("-n", "--count", default=1, show_default=True, type=int, help="Number of children.")
@click.pass_obj
def fork(conn: _Conn, sandbox_id: str, count: int) -> None:
    """Fork a sandbox N times (files only; processes are not copied); print one child id per line."""
    sbx = conn.connect(sandbox_id)
    try:
        kids = sbx.fork(count=count)
    finally:
        sbx.close()
    failed = False
    for k in kids:
        if isinstance(k, SandboxError):
            err.print(f"[red]error[/red] ({k.code}): {escape(k.message)}", highlight=False)
            failed = True
        else:
            click.echo(k.sandbox_id)
            k.close()
    if failed:
        sys.exit(1)


@click.command()
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.option("--timeout", type=float, default=None, help="Lifetime in seconds (default: the daemon's).")
@click.pass_obj
def restore(conn: _Conn, snapshot_ref: str, timeout: float | None) -> None:
    """Restore a snapshot (id or name) into a new sandbox and print its id."""
    sbx = Sandbox.create(snapshot=snapshot_ref, timeout=timeout, base_url=conn.url, api_key=conn.api_key)
    sbx.close()
    click.echo(sbx.sandbox_id)


@click.command()
@click.argument("sandbox_id")
@click.argument("snapshot", required=False)
@click.option("-s", "--snapshot", "snapshot_ref", default=None, help="Reset to this snapshot, not the template.")
@click.pass_obj
def reset(conn: _Conn, sandbox_id: str, snapshot: str | None, snapshot_ref: str | None) -> None:
    """Put a sandbox back on its template, or on SNAPSHOT (an id or name, also -s), keeping its id."""
    if snapshot and snapshot_ref and snapshot != snapshot_ref:
        raise click.UsageError(f"two snapshots given ({snapshot!r} and -s {snapshot_ref!r}): give one")
    snapshot_ref = snapshot or snapshot_ref
    sbx = conn.connect(sandbox_id)
    try:
        sbx.reset(snapshot_ref)
    finally:
        sbx.close()
    click.echo(sandbox_id)
