"""``branchbox cp``: files and directories between the host and a sandbox, streamed, with ``docker cp``'s rules.

- SRC a file: DST an existing directory gets it under its own name; otherwise DST is the file written.
- SRC a directory: DST an existing directory gets it under its own name, unless SRC ends in ``/.`` (then its
  contents); otherwise DST is made and gets the contents. One tar stream either way.
- ``-`` as the local side: standard input (one file's bytes, written to DST) or standard output (one file's
  bytes, or a tar of a directory). Unlike ``docker cp``, a file is not wrapped in a tar: ``cp ID:/f -`` is a cat.
"""

from __future__ import annotations

import os
import posixpath
import sys
from pathlib import Path
from typing import Protocol

import click
from rich.console import Console

from branchbox.sdk import FileNotFoundError_, Sandbox

err = Console(stderr=True)


class _Conn(Protocol):  # branchbox.cli.main._Conn
    def connect(self, sandbox_id: str) -> Sandbox: ...


def split_remote(spec: str) -> tuple[str, str] | None:
    """``ID:/path`` -> (ID, /path); a local path -> None."""
    sid, sep, path = spec.partition(":")
    if sep and path.startswith("/") and sid and "/" not in sid:
        return sid, path
    return None


def _remote_type(sbx: Sandbox, path: str) -> str | None:
    try:
        return sbx.files.get_info(path).type
    except FileNotFoundError_:
        return None


def _name(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) or "root"


def _report(line: str) -> None:
    err.print(line, highlight=False, markup=False)


@click.command(name="cp")
@click.argument("src")
@click.argument("dst")
@click.pass_obj
def cp(conn: _Conn, src: str, dst: str) -> None:
    """Copy a file or a directory between the host and a sandbox (streamed), as docker cp does:
    cp ./a ID:/work/a, cp ID:/etc/os-release ., cp ./src ID:/work (makes /work/src),
    cp ID:/work/out ./out; '-' is stdin (a file's bytes) or stdout (a file's bytes, or a tar of a directory)."""
    rsrc, rdst = split_remote(src), split_remote(dst)
    if (rsrc is None) == (rdst is None):
        raise click.UsageError("exactly one of SRC and DST must be a sandbox path, written ID:/absolute/path")
    remote = rdst or rsrc
    assert remote is not None
    sbx = conn.connect(remote[0])
    try:  # not `with`: that would kill the sandbox at the end
        if rdst is not None:
            _upload(sbx, src, rdst[1])
        else:
            _download(sbx, remote[1], dst)
    finally:
        sbx.close()


def _upload(sbx: Sandbox, src: str, path: str) -> None:
    sid = sbx.sandbox_id
    if src == "-":
        entry = sbx.files.write(path, sys.stdin.buffer)
        _report(f"- -> {sid}:{entry.path} ({entry.size} bytes)")
        return
    local = Path(src)
    if not local.exists():
        raise click.ClickException(f"no such local file or directory: {src}")
    into = _remote_type(sbx, path) == "dir"
    if local.is_dir():
        if into and not src.endswith("/."):
            path = posixpath.join(path, local.resolve().name)
        made = sbx.files.upload_dir(local, path)
        _report(f"{src} -> {sid}:{made.path} ({made.files} files, {made.dirs} dirs, {made.bytes} bytes)")
        return
    if into or path.endswith("/"):
        path = posixpath.join(path, local.name)
    entry = sbx.files.upload(path, local)
    _report(f"{src} -> {sid}:{entry.path} ({entry.size} bytes)")


def _download(sbx: Sandbox, path: str, dst: str) -> None:
    src = f"{sbx.sandbox_id}:{path}"
    kind = _remote_type(sbx, path)
    if kind is None:
        raise FileNotFoundError_(f"No such file or directory in the sandbox: {path}", code="file_not_found")
    if dst == "-":
        out = sys.stdout.buffer
        try:
            if kind == "dir":
                sbx.files.download_archive(path, out)
            else:
                sbx.files.download(path, out)
            out.flush()
        except BrokenPipeError:  # `cp ID:/f - | head`: the reader left early; no second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    target = Path(dst)
    if kind == "dir":
        if target.is_dir() and not path.endswith("/."):
            target = target / _name(path)
        n = sbx.files.download_dir(path, target, on_skipped=lambda name, why: _report(f"left out {name}: {why}"))
        _report(f"{src} -> {target} ({n} entries)")
        return
    if target.is_dir():
        target = target / _name(path)
    n = sbx.files.download(path, target)
    _report(f"{src} -> {target} ({n} bytes)")
