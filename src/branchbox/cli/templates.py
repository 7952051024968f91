"""``branchbox template build|import|ls``: local operations on the template store, with a progress display."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from branchbox.cli.tables import Listing
from branchbox.core.settings import DEFAULT_DATA_DIR
from branchbox.errors import BranchboxError
from branchbox.images import BuildEvent, TemplateStore, default_spec, load_spec
from branchbox.images.oci_fetch import FetchOptions
from branchbox.images.oci_unpack import Budget
from branchbox.models import TemplateInfo
from branchbox.sdk import SandboxError, Template

err = Console(stderr=True)
out = Console()


def _store(data_dir: Path | None, templates_dir: Path | None) -> TemplateStore:
    root = templates_dir or (data_dir or Path(os.environ.get("BRANCHBOX_DATA_DIR") or DEFAULT_DATA_DIR)) / "templates"
    return TemplateStore(root)


def _with_progress(title: str, work: object) -> TemplateInfo:
    """Run a build/import coroutine factory with a rich progress bar fed by its BuildEvents."""
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[step]}"),
        BarColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=False) as progress:
        task = progress.add_task(title, total=1.0, step="start")

        def on_event(ev: BuildEvent) -> None:
            progress.update(task, description=ev.message[:80], step=ev.step)
            if ev.fraction is not None:
                progress.update(task, completed=ev.fraction)

        assert callable(work)
        try:
            info: TemplateInfo = asyncio.run(work(on_event))
        except BranchboxError as exc:
            progress.stop()
            err.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False)
            raise SystemExit(1) from exc
        progress.update(task, completed=1.0, step="done")
    return info


_dirs = [
    click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="[env BRANCHBOX_DATA_DIR]"),
    click.option("--templates-dir", type=click.Path(path_type=Path), default=None, help="Default DATA/templates."),
]


def _with_dirs(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed(_dirs):
        f = opt(f)
    return f


@click.group()
def template() -> None:
    """Templates on this machine (local; no daemon needed)."""


@template.command(name="build")
@click.argument("spec", required=False)
@click.option("--default", "use_default", is_flag=True, help="Build the bundled default template.")
@click.option("--force", is_flag=True, help="Rebuild even when cached.")
@click.option("-f", "--file", "dockerfile", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Build from this Dockerfile with SPEC as the context directory (through the daemon).")  # fmt: skip
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="A Dockerfile ARG value.")
@click.option("--name", default=None, help="Name of the template a Dockerfile build makes.")
@_with_dirs
def build(
    spec: str | None,
    use_default: bool,
    force: bool,
    dockerfile: Path | None,
    build_args: tuple[str, ...],
    name: str | None,
    data_dir: Path | None,
    templates_dir: Path | None,
) -> None:
    """Build a template from SPEC (a TOML spec file, or 'default'; same as --default), or from a Dockerfile:
    `build -f Dockerfile [--build-arg K=V] --name NAME CONTEXT` (CONTEXT/Dockerfile when -f is left out and
    CONTEXT is a directory). Dockerfile builds run in the daemon (RUN steps run in sandboxes): --url/BRANCHBOX_URL.
    """
    if dockerfile is not None or (spec is not None and Path(spec).is_dir()):
        if spec is None or use_default or force:
            raise click.UsageError("a Dockerfile build takes CONTEXT (a directory) and no --default/--force")
        if name is None:
            raise click.UsageError("a Dockerfile build needs --name NAME")
        _build_dockerfile(Path(spec), dockerfile, name, build_args)
        return
    if build_args or name is not None:
        raise click.UsageError("--build-arg and --name are for Dockerfile builds (-f Dockerfile CONTEXT)")
    if (spec is None and not use_default) or (spec not in (None, "default") and use_default):
        raise click.UsageError("give a SPEC file or --default (not both)")
    store = _store(data_dir, templates_dir)
    try:
        tspec = default_spec() if use_default or spec == "default" else load_spec(Path(spec or ""))
    except BranchboxError as exc:
        err.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False)
        raise SystemExit(1) from exc
    info = _with_progress(f"building {tspec.name}", lambda p: store.build(tspec, progress=p, force=force))
    click.echo(f"{info.name} {info.digest}")


def _build_dockerfile(context: Path, dockerfile: Path | None, name: str, build_args: tuple[str, ...]) -> None:
    """Send the context to the daemon and print its build log like `docker build` does."""
    args: dict[str, str] = {}
    for value in build_args:
        key, sep, val = value.partition("=")
        if not key or not sep:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--build-arg")
        args[key] = val
    root = click.get_current_context().find_root().obj
    url, api_key = getattr(root, "url", None), getattr(root, "api_key", None)
    at_line_start = [True]

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "step":
            if not at_line_start[0]:
                err.file.write("\n")
            err.print(f"[bold]Step {ev['step']}/{ev['total']}[/bold] : {escape(str(ev['instruction']))}",
                      highlight=False)  # fmt: skip
            at_line_start[0] = True
        elif kind == "cached":
            err.print(" ---> CACHED", highlight=False)
        elif kind == "log":
            data = str(ev.get("data", ""))
            err.file.write(data)
            err.file.flush()
            if data:
                at_line_start[0] = data.endswith("\n")
        elif kind == "commit":
            if not at_line_start[0]:
                err.file.write("\n")
                at_line_start[0] = True
            err.print(f" ---> {escape(str(ev.get('message', '')))}", highlight=False)
        elif kind == "built":
            err.print(f"Successfully built {ev['name']} ({str(ev['digest'])[:12]}) in {ev['seconds']:.1f} s",
                      highlight=False)  # fmt: skip

    try:
        info = Template.build(context, name=name, dockerfile=dockerfile, build_args=args, on_event=on_event,
                              base_url=url, api_key=api_key)  # fmt: skip
    except (SandboxError, ValueError) as exc:
        if not at_line_start[0]:
            err.file.write("\n")
        code = getattr(exc, "code", "bad_request")
        err.print(f"[red]error[/red] ({code}): {escape(getattr(exc, 'message', str(exc)))}", highlight=False)
        raise SystemExit(1) from exc
    click.echo(f"{info.name} {info.digest}")


@template.command(name="import")
@click.argument("tar", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--name", required=True, help="Template name.")
@click.option(
    "--python",
    default=None,
    help="The image's python3, checked and recorded (optional: the agent brings its own runtime).",
)
@_with_dirs
def import_(tar: Path, name: str, python: str | None, data_dir: Path | None, templates_dir: Path | None) -> None:
    """Import a rootfs tarball as template NAME. Any rootfs works (busybox, alpine, distroless): the image needs
    no Python; without /bin/sh, run commands as argv lists."""
    store = _store(data_dir, templates_dir)
    info = _with_progress(f"importing {name}", lambda p: store.import_tar(tar, name=name, python=python, progress=p))
    click.echo(f"{info.name} {info.digest}")


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(value: str) -> int:
    v = value.strip().lower().removesuffix("b").removesuffix("i")
    unit = v[-1:] if v[-1:] in _SIZE_UNITS else ""
    try:
        n = float(v[: len(v) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 512M, 8G)") from None
    if n <= 0:
        raise click.BadParameter("the size must be positive")
    return int(n * _SIZE_UNITS[unit])


@template.command(name="import-image")
@click.argument("ref")
@click.option("--name", required=True, help="Template name.")
@click.option(
    "--creds",
    envvar="BRANCHBOX_REGISTRY_CREDS",
    default=None,
    help="USER[:PASSWORD] for a docker:// registry (prompts for the password when left out) "
    "[env BRANCHBOX_REGISTRY_CREDS]. Never logged.",
)
@click.option(
    "--authfile", type=click.Path(path_type=Path, dir_okay=False), default=None, help="A containers-auth.json."
)
@click.option("--insecure", is_flag=True, help="Plain HTTP or unverified TLS to the registry (--src-tls-verify=false).")
@click.option("--daemon-host", default=None, help="Docker daemon of docker-daemon: (unix:///PATH or tcp://HOST:PORT).")
@click.option("--max-size", default="16G", show_default=True, help="Refuse images that unpack to more than this.")
@click.option("--max-files", default=1_000_000, show_default=True, help="Refuse images with more entries than this.")
@_with_dirs
def import_image(
    ref: str,
    name: str,
    creds: str | None,
    authfile: Path | None,
    insecure: bool,
    daemon_host: str | None,
    max_size: str,
    max_files: int,
    data_dir: Path | None,
    templates_dir: Path | None,
) -> None:
    """Import a container image as template NAME. REF in skopeo's syntax: docker://registry/repo:tag,
    docker-daemon:repo:tag, docker-archive:PATH, oci-archive:PATH, oci:DIR[:tag]."""
    if creds is not None and ":" not in creds:
        creds = f"{creds}:{click.prompt(f'password for {creds}', hide_input=True, err=True)}"
    store = _store(data_dir, templates_dir)
    opts = FetchOptions(creds=creds, authfile=authfile, tls_verify=not insecure, daemon_host=daemon_host)
    budget = Budget(max_bytes=_size(max_size), max_files=max_files)

    def work(p: object) -> object:
        assert callable(p)

        def on_event(ev: BuildEvent) -> None:
            if ev.step in ("cached", "unpack") and (ev.step == "cached" or " in " in ev.message):
                err.print(f"  {escape(ev.message)}", highlight=False)
            p(ev)

        return store.import_image(ref, name=name, progress=on_event, options=opts, budget=budget)

    info = _with_progress(f"importing {name}", work)
    click.echo(f"{info.name} {info.digest}")


@template.command(name="ls")
@_with_dirs
def ls_(data_dir: Path | None, templates_dir: Path | None) -> None:
    """List templates."""
    table = Listing("NAME", "DIGEST", "SIZE", "SOURCE", keep=("DIGEST", "SIZE"))
    for t in _store(data_dir, templates_dir).list():
        table.add(t.name, t.digest[:12], f"{t.size_bytes / 1e6:.0f} MB", t.source)
    table.print(out)
