"""``branchbox workspace create URL [--branch B | --commit C]``, ``ls``, ``rm``: git workspaces through the SDK."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Protocol, TextIO

import click
from rich.console import Console
from rich.markup import escape

from branchbox.cli.tables import Listing
from branchbox.sdk import SandboxError, Workspace, WorkspaceInfo

out = Console()
err = Console(stderr=True)


class _Conn(Protocol):
    url: str | None
    api_key: str | None


def workspace_json(w: WorkspaceInfo) -> dict[str, Any]:
    d = dataclasses.asdict(w)
    d["created_at"] = w.created_at.isoformat()
    return d


@click.group()
def workspace() -> None:
    """Git workspaces: sandboxes with a repository checked out, from the daemon's cache (create, ls, rm)."""


@workspace.command(name="create")
@click.argument("repository_url")
@click.option("-b", "--branch", default=None, help="Branch (default: the server's default branch).")
@click.option("-c", "--commit", default=None, help="Commit id (detached HEAD).")
@click.option("-t", "--template", default="default", show_default=True)
@click.option("--path", default=None, help="Checkout path in the sandbox [default: /workspace/<name>].")
@click.option("--depth", type=int, default=None, help="Depth of the first fetch of a new repository.")
@click.option("--token-env", default=None, metavar="VAR", help="Read an http(s) token from this env variable.")
@click.option("--ssh-key-file", default=None, metavar="FILE", type=click.File("r"),
              help="Private key (no passphrase) for an ssh repository; sent, never stored.")  # fmt: skip
@click.option("--known-hosts-file", default=None, metavar="FILE", type=click.File("r"),
              help="The ssh server's host keys (ssh-keyscan lines): checked strictly.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def workspace_create(conn: _Conn, repository_url: str, branch: str | None, commit: str | None, template: str,
                     path: str | None, depth: int | None, token_env: str | None, ssh_key_file: TextIO | None,
                     known_hosts_file: TextIO | None, as_json: bool) -> None:  # fmt: skip
    """Create a workspace; print its id, sandbox id, commit and path."""
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        err.print(f"error: environment variable {token_env} is empty or unset", highlight=False, markup=False)
        sys.exit(2)
    ssh_key = ssh_key_file.read() if ssh_key_file is not None else None
    known_hosts = known_hosts_file.read() if known_hosts_file is not None else None
    try:
        ws = Workspace.create(repository_url, branch=branch, commit=commit, template=template, path=path,
                              depth=depth, token=token, ssh_key=ssh_key, known_hosts=known_hosts, base_url=conn.url,
                              api_key=conn.api_key)  # fmt: skip
    except SandboxError as exc:
        err.print(f"error: {escape(f'{exc.message} [{exc.code}]')}", highlight=False)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(workspace_json(ws.info), indent=2))
        return
    i = ws.info
    total = i.timings.get("total", 0.0)
    out.print(f"{i.workspace_id} sandbox={i.sandbox_id} commit={(i.commit or '')[:12]} path={i.path} "
              f"({'cached' if i.cached else 'fetched'}, {total:.0f} ms)", highlight=False, markup=False)  # fmt: skip


@workspace.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def workspace_ls(conn: _Conn, as_json: bool) -> None:
    """List workspaces."""
    items = Workspace.list(base_url=conn.url, api_key=conn.api_key)
    if as_json:
        click.echo(json.dumps([workspace_json(w) for w in items], indent=2))
        return
    if not items:
        out.print("no workspaces: `branchbox workspace create URL` makes one", highlight=False)
        return
    table = Listing("WORKSPACE", "STATUS", "SANDBOX", "REPOSITORY", "REF", "COMMIT", "PATH",
                    keep=("WORKSPACE", "STATUS", "SANDBOX", "COMMIT"))  # fmt: skip
    for w in items:
        table.add(w.workspace_id, w.status, w.sandbox_id or "-", w.repository_url, w.branch or "-",
                  (w.commit or "-")[:12], w.path)  # fmt: skip
    table.print(out)


@workspace.command(name="rm")
@click.argument("workspace_ids", nargs=-1, required=True)
@click.pass_obj
def workspace_rm(conn: _Conn, workspace_ids: tuple[str, ...]) -> None:
    """Delete workspaces (their sandboxes are destroyed; cached commits stay)."""
    failed = False
    for wid in workspace_ids:
        try:
            Workspace.remove(wid, base_url=conn.url, api_key=conn.api_key)
        except SandboxError as exc:
            err.print(escape(f"{wid}: {exc.message} [{exc.code}]"), highlight=False)
            failed = True
    sys.exit(1 if failed else 0)
