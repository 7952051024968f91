"""``branchbox pools [set|rm]``: warm pool statistics and live configuration, through the SDK."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

import click
from rich.console import Console
from rich.text import Text

from branchbox.cli.tables import Listing
from branchbox.sdk import NotFoundError, PoolInfo, PoolSettings, Sandbox

out = Console()


class _Conn(Protocol):
    url: str | None
    api_key: str | None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def pools_table(pools: list[PoolInfo]) -> Listing:
    """The table ``branchbox pools`` prints."""
    numbers = ("READY", "BOOTING", "CLAIMED", "HITS", "MISSES", "P50 CLAIM MS", "TARGET", "MAX")
    table = Listing("TEMPLATE", "BACKEND", *numbers, keep=numbers)
    for p in pools:
        table.add(
            p.template,
            p.backend or "-",
            Text(str(p.ready), style="green" if p.ready else "yellow"),
            str(p.booting),
            str(p.claimed),
            str(p.hits),
            str(p.misses),
            _ms(p.claim_p50_ms),
            str(p.target),
            str(p.settings.max_size),
        )
    return table


def pool_json(p: PoolInfo) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["config"] = d.pop("settings")
    return d


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.pass_context
def pools(ctx: click.Context, as_json: bool) -> None:
    """Show warm pools (ready, booting, claimed, hits, misses, p50 claim time); see `pools set` / `pools rm`."""
    if ctx.invoked_subcommand is not None:
        return
    conn: _Conn = ctx.obj
    infos = Sandbox.pools(base_url=conn.url, api_key=conn.api_key)
    if as_json:
        click.echo(json.dumps([pool_json(p) for p in infos], indent=2))
    elif not infos:
        out.print("no warm pools: `branchbox pools set TEMPLATE --min-size N` makes one", highlight=False)
    else:
        pools_table(infos).print(out)


@pools.command(name="set")
@click.argument("template")
@click.option("--backend", default=None, help="The backend of the pool (default: the daemon's); one pool per backend.")
@click.option("--min-size", type=int, default=None, help="Members kept at all times.")
@click.option("--max-size", type=int, default=None, help="Never more members than this.")
@click.option("--target-free", type=int, default=None, help="Ready members the replenisher keeps.")
@click.option("--max-memory-mb", type=int, default=None, help="Memory budget of idle members.")
@click.option("--max-parallel-boots", type=int, default=None)
@click.option("--reuse/--no-reuse", default=None, help="Reset released sandboxes into the pool.")
@click.option("--cpu", type=float, default=None, help="Resources of members (creates must match to be warm).")
@click.option("--memory-mb", type=int, default=None)
@click.option("--pids", type=int, default=None)
@click.pass_obj
def pools_set(conn: _Conn, /, template: str, backend: str | None, **given: Any) -> None:
    """Create or change the warm pool of TEMPLATE (on --backend), live. Options not given keep their current value
    (or the default for a new pool)."""
    try:
        current = Sandbox.get_pool(template, backend=backend, base_url=conn.url, api_key=conn.api_key).settings
    except NotFoundError:
        current = PoolSettings()
    merged = dataclasses.replace(current, **{k: v for k, v in given.items() if v is not None})
    info = Sandbox.configure_pool(
        template, backend=backend, **dataclasses.asdict(merged), base_url=conn.url, api_key=conn.api_key
    )
    pools_table([info]).print(out)


@pools.command(name="rm")
@click.argument("templates", nargs=-1, required=True)
@click.option("--backend", default=None, help="The backend of the pools (default: the daemon's).")
@click.pass_obj
def pools_rm(conn: _Conn, templates: tuple[str, ...], backend: str | None) -> None:
    """Remove warm pools (their ready members are destroyed; claimed sandboxes stay)."""
    for template in templates:
        Sandbox.remove_pool(template, backend=backend, base_url=conn.url, api_key=conn.api_key)
        click.echo(template)
