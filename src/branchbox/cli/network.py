"""``branchbox network ID`` (show or change a sandbox's egress policy) and ``branchbox port ID PORT`` (the URL that
reaches a port inside it), through the SDK."""

from __future__ import annotations

import json
from typing import Protocol

import click

from branchbox.sdk import NetworkInfo, Sandbox


class _Conn(Protocol):
    url: str | None
    api_key: str | None


def network_patch(allow_out: tuple[str, ...], deny_out: tuple[str, ...], internet: bool | None) -> dict[str, object]:
    """Options -> an update: ``--allow-out ''`` (one empty value) clears that list."""
    patch: dict[str, object] = {}
    if allow_out:
        patch["allow_out"] = [a for a in allow_out if a]
    if deny_out:
        patch["deny_out"] = [d for d in deny_out if d]
    if internet is not None:
        patch["allow_internet_access"] = internet
    return patch


def _show(net: NetworkInfo) -> None:
    click.echo(
        json.dumps(
            {
                "address": net.address,
                "allow_internet_access": net.allow_internet_access,
                "allow_out": net.allow_out,
                "deny_out": net.deny_out,
            },
            indent=2,
        )
    )


@click.command(name="network")
@click.argument("sandbox_id")
@click.option("--allow-out", multiple=True, metavar="CIDR|DOMAIN", help="Replace allow_out ('' clears it).")
@click.option("--deny-out", multiple=True, metavar="CIDR|DOMAIN", help="Replace deny_out ('' clears it).")
@click.option("--internet/--no-internet", default=None, help="Egress to the public internet.")
@click.pass_obj
def network(
    conn: _Conn, sandbox_id: str, allow_out: tuple[str, ...], deny_out: tuple[str, ...], internet: bool | None
) -> None:
    """Show a sandbox's address and egress policy; with options, change it live."""
    sbx = Sandbox.connect(sandbox_id, base_url=conn.url, api_key=conn.api_key)
    try:  # not `with`: that would kill the sandbox at the end
        patch = network_patch(allow_out, deny_out, internet)
        _show(sbx.update_network(patch) if patch else sbx.get_network())
    finally:
        sbx.close()


@click.command(name="port")
@click.argument("sandbox_id")
@click.argument("port", type=click.IntRange(1, 65535))
@click.pass_obj
def port(conn: _Conn, sandbox_id: str, port: int) -> None:
    """Print the daemon URL that reaches PORT inside the sandbox (HTTP; ws:// for WebSocket)."""
    sbx = Sandbox.connect(sandbox_id, base_url=conn.url, api_key=conn.api_key)
    try:
        click.echo(sbx.get_host(port))
    finally:
        sbx.close()
