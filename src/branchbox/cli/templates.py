"""``branchbox template build|import|ls``: local operations on the template store, with a progress display."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from branchbox.cli.tables import Listing
from branchbox.core.models import TemplateInfo
from branchbox.core.settings import DEFAULT_DATA_DIR
from branchbox.errors import BranchboxError
from branchbox.images import BuildEvent, TemplateStore, default_spec, load_spec
from branchbox.images.oci_fetch import FetchOptions
from branchbox.images.oci_unpack import Budget

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
@_with_dirs
def build(spec: str | None, use_default: bool, force: bool, data_dir: Path | None, templates_dir: Path | None) -> None:
    """Build a template from SPEC (a TOML spec file, or 'default'; same as --default)."""
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
@click.option("--max-size", default="16G", show_default=True, help="Refuse images that unpack to more than this.")
@click.option("--max-files", default=1_000_000, show_default=True, help="Refuse images with more entries than this.")
@_with_dirs
def import_image(
    ref: str,
    name: str,
    creds: str | None,
    authfile: Path | None,
    insecure: bool,
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
    opts = FetchOptions(creds=creds, authfile=authfile, tls_verify=not insecure)
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
