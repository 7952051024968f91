"""The ``branchbox`` command line. Sandbox commands go through the SDK to a running daemon; ``serve`` runs
the daemon; ``template`` works locally on the data directory; ``openapi`` prints the API document."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from branchbox.cli import shell as shell_mod
from branchbox.cli.copy import cp
from branchbox.cli.fleet import fleet, fleet_join_hook
from branchbox.cli.network import network, network_patch, port
from branchbox.cli.pools import pools
from branchbox.cli.snapshots import fork, reset, restore, snapshot
from branchbox.cli.storage import storage
from branchbox.cli.tables import Listing
from branchbox.cli.templates import template
from branchbox.cli.workspaces import workspace
from branchbox.sdk import Sandbox, SandboxError, SandboxInfo

out = Console()
err = Console(stderr=True)


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", param_hint=what)
        result[key] = val
    return result


class _Conn:
    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url, self.api_key = url, api_key

    def connect(self, sandbox_id: str) -> Sandbox:
        return Sandbox.connect(sandbox_id, base_url=self.url, api_key=self.api_key)


class _Group(click.Group):
    """Turns SDK errors into one red line and exit status 1 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SandboxError as exc:
            err.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--url", envvar="BRANCHBOX_URL", default=None, help="Daemon URL [env BRANCHBOX_URL].")
@click.option("--api-key", envvar="BRANCHBOX_API_KEY", default=None, help="API key [env BRANCHBOX_API_KEY].")
@click.version_option(package_name="branchbox", message="branchbox %(version)s")
@click.pass_context
def cli(ctx: click.Context, url: str | None, api_key: str | None) -> None:
    """branchbox: sandboxes for AI agents."""
    ctx.obj = _Conn(url, api_key)


def _state_style(state: str) -> str:
    return {"running": "green", "paused": "yellow", "error": "red"}.get(state, "dim")


def _info_json(i: SandboxInfo) -> dict[str, Any]:
    return {
        "sandbox_id": i.sandbox_id,
        "template_id": i.template_id,
        "state": i.state,
        "metadata": i.metadata,
        "started_at": i.started_at.isoformat(),
        "end_at": i.end_at.isoformat() if i.end_at else None,
        "backend": i.backend,
        "source": i.source,
        "cpu": i.cpu,
        "memory_mb": i.memory_mb,
        "disk_mb": i.disk_mb,
        "on_timeout": i.on_timeout,
        "auto_resume": i.auto_resume,
        "timings": i.timings,
    }


@cli.command()
@click.option("-t", "--template", default="default", show_default=True)
@click.option("--timeout", type=float, default=None, help="Lifetime in seconds (default: the daemon's).")
@click.option("-e", "--env", "envs", multiple=True, metavar="KEY=VALUE")
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE")
@click.option("--cpu", type=float, default=None)
@click.option("--memory-mb", type=int, default=None)
@click.option("--disk", "disk_mb", type=int, default=None, metavar="MIB", help="Disk limit (default: the daemon's).")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@click.option("--timings", is_flag=True, help="Show the per-phase create timing.")
@click.option("--internet/--no-internet", default=None, help="Egress to the public internet (default: on).")
@click.option("--allow-out", multiple=True, metavar="CIDR|DOMAIN", help="Allowed destinations (docs/networking.md).")
@click.option("--deny-out", multiple=True, metavar="CIDR|DOMAIN", help="Denied destinations (allow-out wins).")
@click.option(
    "--on-timeout",
    type=click.Choice(["destroy", "pause"]),
    default=None,
    help="What reaching the timeout does (default: destroy); pause keeps it until resumed.",
)
@click.option("--auto-resume", is_flag=True, help="With --on-timeout pause: the next command or file call resumes it.")
@click.pass_obj
def create(
    conn: _Conn,
    template: str,
    timeout: float | None,
    envs: tuple[str, ...],
    metadata: tuple[str, ...],
    cpu: float | None,
    memory_mb: int | None,
    disk_mb: int | None,
    as_json: bool,
    timings: bool,
    internet: bool | None,
    allow_out: tuple[str, ...],
    deny_out: tuple[str, ...],
    on_timeout: str | None,
    auto_resume: bool,
) -> None:
    """Create a sandbox and print its id."""
    net = network_patch(allow_out, deny_out, None)
    with err.status(f"creating a sandbox from {template}..."):
        sbx = Sandbox.create(
            template,
            timeout=timeout,
            envs=_pairs(envs, "--env"),
            metadata=_pairs(metadata, "--metadata"),
            cpu=cpu,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            allow_internet_access=internet,
            network=net or None,
            on_timeout=on_timeout,
            auto_resume=auto_resume or None,
            base_url=conn.url,
            api_key=conn.api_key,
        )
    sbx.close()
    if as_json:
        click.echo(json.dumps(_info_json(sbx.info), indent=2))
        return
    click.echo(sbx.sandbox_id)
    if timings:
        table = Table("phase", "ms", title=f"create ({sbx.info.source})")
        for phase, ms in sbx.info.timings.items():
            table.add_row(phase, f"{ms:.2f}")
        err.print(table)


@cli.command(name="ls")
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE", help="Only sandboxes with this metadata.")
@click.option("--state", multiple=True, help="Only these states.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ls_(conn: _Conn, metadata: tuple[str, ...], state: tuple[str, ...], as_json: bool) -> None:
    """List sandboxes."""
    infos = Sandbox.list(
        metadata=_pairs(metadata, "--metadata"),
        state=list(state) or None,
        base_url=conn.url,
        api_key=conn.api_key,
    )
    if as_json:
        click.echo(json.dumps([_info_json(i) for i in infos], indent=2))
        return
    table = Listing("SANDBOX ID", "TEMPLATE", "STATE", "STARTED", "ENDS", "METADATA",
                    keep=("SANDBOX ID", "STATE", "ENDS"))  # fmt: skip
    for i in infos:
        table.add(
            i.sandbox_id,
            i.template_id,
            Text(i.state, style=_state_style(i.state)),
            i.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            i.end_at.strftime("%H:%M:%S") if i.end_at else "-",
            ",".join(f"{k}={v}" for k, v in i.metadata.items()),
        )
    table.print(out)


@cli.command()
@click.argument("sandbox_ids", nargs=-1, required=True)
@click.pass_obj
def rm(conn: _Conn, sandbox_ids: tuple[str, ...]) -> None:
    """Destroy sandboxes."""
    failed = False
    for sid in sandbox_ids:
        try:
            sbx = conn.connect(sid)
            sbx.kill()
            sbx.close()
            click.echo(sid)
        except SandboxError as exc:
            err.print(f"[red]{escape(sid)}[/red]: {escape(exc.message)}", highlight=False)
            failed = True
    if failed:
        sys.exit(1)


@cli.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-e", "--env", "envs", multiple=True, metavar="KEY=VALUE")
@click.option("--cwd", default=None)
@click.option("--user", default=None)
@click.option("--timeout", type=float, default=None, help="Kill the command after this many seconds.")
@click.option(
    "-i",
    "--interactive",
    is_flag=True,
    help="Send standard input (text, read to its end) to the command. A live terminal: branchbox shell.",
)
@click.pass_obj
def exec_(
    conn: _Conn,
    sandbox_id: str,
    cmd: tuple[str, ...],
    envs: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    interactive: bool,
) -> None:
    """Run a command, streaming its output; exits with its exit code.

    One argument runs under /bin/sh -c; several form an argv: branchbox exec ID -- ls -la /.
    With -i the command reads standard input: echo 'print(42)' | branchbox exec -i ID -- python3 -
    """
    stdin = sys.stdin.read() if interactive else None
    sbx = conn.connect(sandbox_id)

    def to_out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def to_err(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    try:
        command: str | list[str] = cmd[0] if len(cmd) == 1 else list(cmd)
        result = sbx.commands.run(
            command,
            envs=_pairs(envs, "--env"),
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin,
            on_stdout=to_out,
            on_stderr=to_err,
        )
    finally:
        sbx.close()
    sys.exit(result.exit_code)


@cli.command()
@click.argument("sandbox_id")
@click.pass_obj
def ps(conn: _Conn, sandbox_id: str) -> None:
    """List the processes the agent started in a sandbox."""
    sbx = conn.connect(sandbox_id)
    try:
        procs = sbx.commands.list()
    finally:
        sbx.close()
    table = Listing("PID", "RUNNING", "EXIT", "TAG", "COMMAND", keep=("PID", "RUNNING", "EXIT"))
    for p in procs:
        exit_code = "" if p.exit_code is None else str(p.exit_code)
        table.add(str(p.pid), "yes" if p.running else "no", exit_code, p.tag or "", " ".join(p.cmd))
    table.print(out)


@cli.command()
@click.argument("sandbox_id")
@click.argument("pid", type=int)
@click.pass_obj
def logs(conn: _Conn, sandbox_id: str, pid: int) -> None:
    """Attach to a running process and stream its output until it exits."""
    sbx = conn.connect(sandbox_id)
    try:
        result = sbx.commands.connect(pid).wait(
            on_stdout=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
            on_stderr=lambda t: (sys.stderr.write(t), sys.stderr.flush()),
        )
    finally:
        sbx.close()
    sys.exit(result.exit_code)


@cli.command()
@click.argument("sandbox_id")
@click.option("--cmd", default=None, help="Program to run instead of a login bash.")
@click.pass_obj
def shell(conn: _Conn, sandbox_id: str, cmd: str | None) -> None:
    """Open an interactive terminal in a sandbox."""
    sbx = conn.connect(sandbox_id)
    try:
        code = shell_mod.run_shell(sbx, cmd)
    finally:
        sbx.close()
    sys.exit(code)


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML config file.")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 7077).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--templates-dir", type=click.Path(path_type=Path), default=None)
@click.option("--backend", "default_backend", default=None)
@click.option("--api-keys-file", type=click.Path(path_type=Path), default=None)
@click.option("--keep-sandboxes/--stop-sandboxes", "keep_sandboxes_on_shutdown", default=None)
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default=None, type=click.Choice(["json", "console"]))
@click.option(
    "--fleet",
    "fleet_address",
    default=None,
    metavar="HOST:PORT",
    help="Join the fleet on this Ray cluster [env BRANCHBOX_FLEET_ADDRESS] (docs/fleet.md).",
)
@click.option("--fleet-name", default=None, help="This node's name in the fleet (default HOSTNAME:PORT).")
@click.option("--fleet-label", "fleet_labels", multiple=True, metavar="KEY=VALUE", help="A placement label.")
def serve(
    config_file: Path | None,
    fleet_address: str | None,
    fleet_name: str | None,
    fleet_labels: tuple[str, ...],
    **flags: Any,
) -> None:
    """Run the daemon. Precedence: flags > BRANCHBOX_* env > config file > defaults."""
    from branchbox.daemon.config import ConfigError, load_config  # noqa: PLC0415 - keep CLI start-up light
    from branchbox.daemon.serve import run  # noqa: PLC0415

    try:
        cfg = load_config(config_file, flags=flags)
    except ConfigError as exc:
        err.print(f"[red]config error[/red]: {escape(exc.message)}", highlight=False)
        sys.exit(2)
    run(cfg, fleet_join_hook(cfg.host, fleet_address, fleet_name, fleet_labels, cfg.fleet))


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write here (default stdout).")
def openapi(output: Path | None) -> None:
    """Print the OpenAPI document (the checked-in docs/openapi.json is this output)."""
    from branchbox.api.app import openapi_json  # noqa: PLC0415

    text = openapi_json()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


@cli.group()
def key() -> None:
    """API keys."""


@key.command(name="new")
@click.option("--e2b", "e2b_format", is_flag=True, help="In E2B's format (e2b_ + 40 hex digits): some e2b SDKs (2.45) "
              "refuse other keys before sending them (docs/e2b.md).")  # fmt: skip
def key_new(e2b_format: bool) -> None:
    """Print a new API key and the sha256 hash the daemon stores (api_key_hashes / api_keys_file)."""
    import secrets  # noqa: PLC0415

    from branchbox.api.auth import generate_api_key, hash_api_key  # noqa: PLC0415

    k = "e2b_" + secrets.token_hex(20) if e2b_format else generate_api_key()
    click.echo(f"key:  {k}\nhash: {hash_api_key(k)}")


cli.add_command(template)
cli.add_command(pools)
cli.add_command(storage)
cli.add_command(network)
cli.add_command(port)
cli.add_command(cp)
cli.add_command(workspace)
cli.add_command(fleet)
for _cmd in (snapshot, fork, restore, reset):
    cli.add_command(_cmd)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="branchbox")
