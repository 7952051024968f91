"""``branchbox fleet ...``: run the controller, list nodes, drain one; and the ``serve --fleet`` join hook.

Nothing here imports Ray until a fleet command runs (the extra ``branchbox[fleet]``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from branchbox.sdk._config import ConnectionConfig
from branchbox.sdk._http1 import WireError
from branchbox.sdk._wire import Wire

out = Console()
err = Console(stderr=True)


def _need_ray() -> None:
    try:
        import ray  # noqa: F401, PLC0415
    except ImportError:
        err.print("[red]error[/red]: the fleet needs Ray: pip install 'branchbox[fleet]'", highlight=False)
        sys.exit(2)


def fleet_join_hook(
    host: str,
    address: str | None,
    name: str | None,
    labels: tuple[str, ...],
    table: Mapping[str, Any] | None = None,
) -> Callable[[int], Callable[[], None]] | None:
    """The daemon's join hook when ``--fleet``, ``BRANCHBOX_FLEET_ADDRESS`` or the config file's ``[fleet]``
    ``address`` is given, else None."""
    from branchbox.errors import BadRequestError  # noqa: PLC0415
    from branchbox.fleet.node import JoinSettings, join, parse_labels  # noqa: PLC0415 - light (no Ray import)

    try:
        settings = JoinSettings.from_env(address, table=table, name=name, labels=parse_labels(labels))
    except (BadRequestError, ValueError) as exc:
        msg = exc.message if isinstance(exc, BadRequestError) else str(exc)
        err.print(f"[red]config error[/red]: fleet: {escape(msg)}", highlight=False)
        sys.exit(2)
    if not settings.address:
        return None
    _need_ray()
    import socket  # noqa: PLC0415

    def hook(port: int) -> Callable[[], None]:
        where = host if host not in ("0.0.0.0", "::", "") else socket.getfqdn()  # noqa: S104 - compared, not bound
        url = settings.url or f"http://{where}:{port}"
        return join(settings, url, port).leave

    return hook


def _call(ctx: click.Context, method: str, path: str, body: Any = None) -> Any:
    """One request to the fleet controller (the SDK's client); an error is printed and ends the command."""
    conn = ctx.find_root().obj
    url = (getattr(conn, "url", None) or "http://127.0.0.1:7080").rstrip("/")
    wire = Wire(ConnectionConfig(base_url=url, api_key=getattr(conn, "api_key", None), request_timeout=30.0))
    try:
        resp = wire.request(method, path, None if body is None else json.dumps(body).encode(), 30.0)
    except WireError as exc:
        err.print(f"[red]error[/red] cannot reach the fleet controller at {escape(url)} ({escape(str(exc))})")
        sys.exit(1)
    finally:
        wire.close()
    if resp.status_code >= 400:
        try:
            e = resp.json()["error"]
            msg = f"({e['code']}): {e['message']}"
        except (ValueError, KeyError, TypeError):
            msg = f"HTTP {resp.status_code}: {resp.content[:200].decode(errors='replace')}"
        err.print(f"[red]error[/red] {escape(msg)}", highlight=False)
        sys.exit(1)
    return resp.json()


@click.group()
def fleet() -> None:
    """Many hosts behind one controller, on Ray (docs/fleet.md). --url points at the controller."""


@fleet.command(name="serve")
@click.option(
    "--address",
    envvar="BRANCHBOX_FLEET_ADDRESS",
    required=True,
    metavar="HOST:PORT",
    help="The Ray cluster's GCS address (ray start --head prints it) [env BRANCHBOX_FLEET_ADDRESS].",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=7080, show_default=True)
@click.option("--policy", type=click.Choice(["spread", "pack"]), default="spread", show_default=True)
@click.option("--stale-after", type=float, default=1.5, show_default=True, help="Seconds without a push: lost.")
@click.option(
    "--placement-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds a create waits for room before no_capacity.",
)
@click.option("--backend", "default_backend", default="container", show_default=True)
@click.option(
    "--api-keys-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Key hashes the controller checks (give the nodes the same file).",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def fleet_serve(
    address: str,
    host: str,
    port: int,
    policy: str,
    stale_after: float,
    placement_timeout: float,
    default_backend: str,
    api_keys_file: Path | None,
    log_level: str,
) -> None:
    """Run the fleet controller: the daemon's HTTP API for every node of the fleet."""
    _need_ray()
    from branchbox.api.auth import ApiKeyChecker  # noqa: PLC0415
    from branchbox.fleet.controller import ControllerSettings  # noqa: PLC0415
    from branchbox.fleet.serve import run_fleet  # noqa: PLC0415

    hashes: list[str] = []
    if api_keys_file is not None:
        hashes = [ln.split("#", 1)[0].strip() for ln in api_keys_file.read_text().splitlines()]
        hashes = [h for h in hashes if h]
    settings = ControllerSettings(
        address=address,
        policy=policy,  # type: ignore[arg-type]
        stale_after=stale_after,
        placement_timeout=placement_timeout,
        default_backend=default_backend,
    )
    keys = ApiKeyChecker(hashes, required=bool(hashes) or host not in ("127.0.0.1", "localhost", "::1"))
    run_fleet(settings, host=host, port=port, keys=keys, log_level=log_level)


@fleet.command(name="nodes")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def fleet_nodes(ctx: click.Context, as_json: bool) -> None:
    """The fleet's nodes with their capacity and health."""
    nodes = _call(ctx, "GET", "/v1/fleet/nodes")
    if as_json:
        click.echo(json.dumps(nodes, indent=2))
        return
    table = Table("NODE", "STATE", "RUNNING", "MEM FREE", "CPU FREE", "WARM", "LAST PUSH", "URL")
    for n in nodes:
        style = {"ready": "green", "draining": "yellow", "lost": "red"}[n["state"]]
        warm = ", ".join(f"{w['template']}:{w['ready']}" for w in n["warm"]) or "-"
        state = n["state"] + (f" ({n['lost_reason']})" if n.get("lost_reason") else "")
        table.add_row(
            n["node"], f"[{style}]{escape(state)}[/{style}]", str(n["running"]), f"{n['memory_mb_free']} MiB",
            f"{n['cpu_free']:g}", escape(warm), f"{n['seconds_since_push']:.1f} s ago", n["url"],
        )  # fmt: skip
    out.print(table)


@fleet.command(name="drain")
@click.argument("node")
@click.option("--undo", is_flag=True, help="Take new sandboxes again.")
@click.pass_context
def fleet_drain(ctx: click.Context, node: str, undo: bool) -> None:
    """Stop new placements on NODE (its sandboxes keep running)."""
    got = _call(ctx, "POST", f"/v1/fleet/nodes/{quote(node, safe='')}/drain", {"draining": not undo})
    click.echo(f"{got['node']}: {got['state']}")
