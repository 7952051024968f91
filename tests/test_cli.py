"""The ``branchbox`` CLI as a subprocess against a real daemon."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from branchbox.api.auth import hash_api_key
from branchbox.cli.tables import Listing
from branchbox.sdk import Sandbox
from tests.conftest import DaemonProc, cli_env, templates_dir


def bb(
    *args: str, url: str | None = None, stdin: bytes | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "branchbox.cli"]
    if url is not None:
        argv += ["--url", url]
    return subprocess.run(
        argv + list(args),
        env=cli_env(COLUMNS=str(columns)),
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_key_new_prints_a_key_and_its_hash() -> None:
    out = bb("key", "new")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.strip().splitlines())
    assert hash_api_key(lines["key"].strip()) == lines["hash"].strip()


def test_unreachable_daemon_is_one_line_not_a_traceback() -> None:
    # a port that surely refuses: bound by this test (nobody else can listen there) and not listening
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        out = bb("ls", url=f"http://127.0.0.1:{closed.getsockname()[1]}")
    assert out.returncode == 1
    assert "connection_error" in out.stderr
    assert "Traceback" not in out.stderr


def test_listing_keeps_ids_whole_on_a_narrow_terminal() -> None:
    table = Listing("ID", "STATE", "NOTE", keep=("ID", "STATE"))
    table.add("8a455d7e828df0e9e5a0", Text("running", style="green"), "[/] " + "word " * 30)
    screen = io.StringIO()
    table.print(Console(file=screen, width=50, force_terminal=True, color_system=None))
    lines = screen.getvalue().splitlines()
    assert lines[1].startswith("8a455d7e828df0e9e5a0  running  [/] word")  # the note gives way, on more lines
    assert len(lines) > 3 and max(len(line) for line in lines) <= 50
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        table.add("a", "b")
    with pytest.raises(ValueError, match="lacks"):
        Listing("ID", keep=("SANDBOX",))


@pytest.mark.root
def test_template_ls_is_local(default_template: object) -> None:
    out = bb("template", "ls", "--templates-dir", str(templates_dir()))
    assert out.returncode == 0, out.stderr
    assert "default" in out.stdout


@pytest.mark.root
def test_create_ls_exec_cp_rm(daemon: DaemonProc, tmp_path: Path) -> None:
    url = daemon.url
    made = bb("create", "-m", "team=cli", "-e", "GREETING=hey", "--json", url=url)
    assert made.returncode == 0, made.stderr
    sid = json.loads(made.stdout)["sandbox_id"]
    assert json.loads(made.stdout)["timings"]["total"] > 0
    listed = bb("ls", url=url)
    assert sid in listed.stdout
    assert "running" in listed.stdout
    assert [s["sandbox_id"] for s in json.loads(bb("ls", "-m", "team=cli", "--json", url=url).stdout)] == [sid]
    assert json.loads(bb("ls", "-m", "team=other", "--json", url=url).stdout) == []

    run = bb("exec", sid, "--", "sh", "-c", "echo $GREETING; echo err >&2; exit 3", url=url)
    assert (run.returncode, run.stdout, run.stderr) == (3, "hey\n", "err\n")
    assert bb("exec", sid, "echo one string | tr a-z A-Z", url=url).stdout == "ONE STRING\n"
    piped = bb("exec", "-i", sid, "--", "python3", "-", url=url, stdin=b"print(40 + 2)\n")  # stdin with -i only
    assert (piped.returncode, piped.stdout) == (0, "42\n"), piped.stderr
    assert bb("exec", sid, "--", "cat", url=url, stdin=b"not sent\n").stdout == ""
    for argv in (["no-such-program"], ["no-such-program", "a"]):  # a string and an argv: the shell's answer
        missing = bb("exec", sid, "--", *argv, url=url)
        assert (missing.returncode, "no-such-program: command not found" in missing.stderr) == (127, True), missing

    local = tmp_path / "in.txt"
    local.write_bytes(b"payload\x00\x01" * 1000)
    up = bb("cp", str(local), f"{sid}:/work/in.txt", url=url)
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back"
    back.mkdir()
    down = bb("cp", f"{sid}:/work/in.txt", str(back), url=url)
    assert down.returncode == 0, down.stderr
    assert (back / "in.txt").read_bytes() == local.read_bytes()
    assert bb("cp", "a", "b", url=url).returncode == 2  # neither side is a sandbox path
    _cp_directories_and_pipes(url, sid, tmp_path)

    # what users chose is printed as it is (never read as markup), and into a pipe each sandbox is one line with
    # its whole id, however narrow the terminal
    marked = bb("create", "-m", "note=[/] [bold]x[/bold]", url=url)
    assert marked.returncode == 0, marked.stderr
    other = marked.stdout.strip()
    narrow = bb("ls", url=url, columns=40)
    assert narrow.returncode == 0, narrow.stderr
    rows = {line.split()[0]: line for line in narrow.stdout.splitlines()[1:]}
    assert set(rows) == {sid, other}
    assert "note=[/] [bold]x[/bold]" in rows[other] and "running" in rows[sid]
    unknown = bb("rm", "[/]", other, url=url)  # an id that is markup: an error line, and the next id goes on
    assert unknown.returncode == 1 and "[/]" in unknown.stderr and "Traceback" not in unknown.stderr
    assert unknown.stdout.split() == [other]
    slashed = bb("rm", "a/b", url=url)  # the SDK quotes the id; the daemon answers for the id, not a route
    assert slashed.returncode == 1 and "sandbox 'a/b' does not exist" in slashed.stderr, slashed.stderr

    assert bb("rm", sid, url=url).returncode == 0
    assert sid not in bb("ls", url=url).stdout
    gone = bb("rm", sid, url=url)
    assert gone.returncode == 1
    assert sid in gone.stderr


@pytest.mark.root
def test_logs_ps_and_shell(daemon: DaemonProc) -> None:
    url = daemon.url
    with Sandbox.create(base_url=url) as sbx:
        h = sbx.commands.run("sleep 1; echo late; exit 6", background=True)
        assert str(h.pid) in bb("ps", sbx.sandbox_id, url=url).stdout
        logs = bb("logs", sbx.sandbox_id, str(h.pid), url=url)
        assert (logs.returncode, logs.stdout) == (6, "late\n")
        sh = bb("shell", sbx.sandbox_id, url=url, stdin=b"echo from-shell-$((6*7))\nexit 4\n")
        assert sh.returncode == 4, sh.stderr
        assert "from-shell-42" in sh.stdout
        eof = bb("shell", sbx.sandbox_id, "--cmd", "/bin/sh", url=url, stdin=b"echo bye\n")  # EOF ends the shell
        assert eof.returncode == 0, eof.stderr
        assert "bye" in eof.stdout


def _cp_directories_and_pipes(url: str, sid: str, tmp_path: Path) -> None:
    """docker cp's rules: a directory lands under its own name in an existing directory (its contents with
    ``/.``), or becomes a new one; ``-`` is stdin or stdout. Local and remote misses are one error line."""
    src = tmp_path / "proj"
    (src / "sub").mkdir(parents=True)
    (src / "sub/a.txt").write_text("A")
    os.symlink("sub/a.txt", src / "link")
    assert bb("cp", str(src), f"{sid}:/work", url=url).returncode == 0  # /work exists: /work/proj
    assert bb("cp", f"{src}/.", f"{sid}:/work/flat", url=url).returncode == 0  # contents into a new directory
    listing = bb("exec", sid, "cd /work && find proj flat | sort && readlink proj/link", url=url).stdout.split()
    tree = ["", "/link", "/sub", "/sub/a.txt"]
    assert listing == [f"flat{t}" for t in tree] + [f"proj{t}" for t in tree] + ["sub/a.txt"]
    down = bb("cp", f"{sid}:/work/proj", str(tmp_path / "down"), url=url)  # a new local directory
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "down/sub/a.txt").read_text() == "A"
    assert os.readlink(tmp_path / "down/link") == "sub/a.txt"
    assert bb("cp", f"{sid}:/work/proj", str(tmp_path / "down"), url=url).returncode == 0  # exists: down/proj
    assert (tmp_path / "down/proj/sub/a.txt").read_text() == "A"
    assert bb("exec", sid, "ln -s /etc/passwd /work/proj/abs", url=url).returncode == 0
    told = bb("cp", f"{sid}:/work/proj", str(tmp_path / "told"), url=url)
    assert told.returncode == 0 and "left out abs: a symlink to /etc/passwd" in told.stderr, told.stderr
    assert not (tmp_path / "told/abs").exists() and (tmp_path / "told/sub/a.txt").is_file()

    assert bb("cp", "-", f"{sid}:/work/piped.txt", url=url, stdin=b"from stdin\n").returncode == 0
    assert bb("cp", f"{sid}:/work/piped.txt", "-", url=url).stdout == "from stdin\n"
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    tar = subprocess.run(
        [sys.executable, "-m", "branchbox.cli", "--url", url, "cp", f"{sid}:/work/proj", "-"],
        env=cli_env(),
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert sorted(archive.getnames()) == ["abs", "link", "sub", "sub/a.txt"]  # the raw tar keeps every link

    missing = bb("cp", str(tmp_path / "nope"), f"{sid}:/work", url=url)
    assert missing.returncode == 1 and "no such local file or directory" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr
    gone = bb("cp", f"{sid}:/work/nope", str(tmp_path), url=url)
    assert gone.returncode == 1 and "file_not_found" in gone.stderr and "Traceback" not in gone.stderr


@pytest.mark.root
def test_create_with_pause_on_timeout_and_auto_resume(daemon: DaemonProc) -> None:
    """`branchbox create --on-timeout pause --auto-resume`: paused at its timeout, woken by the next exec."""
    made = bb("create", "--timeout", "2", "--on-timeout", "pause", "--auto-resume", "--json", url=daemon.url)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert (info["on_timeout"], info["auto_resume"]) == ("pause", True)
    sid = info["sandbox_id"]

    def state(sid: str) -> str:
        return str(
            next(s["state"] for s in json.loads(bb("ls", "--json", url=daemon.url).stdout) if s["sandbox_id"] == sid)
        )

    try:
        deadline = time.monotonic() + 90  # a bound on a loaded host
        while state(sid) != "paused":
            assert time.monotonic() < deadline, "the sandbox did not pause at its timeout"
            time.sleep(0.3)
        woken = bb("exec", sid, "--", "echo", "awake", url=daemon.url)
        assert (woken.returncode, woken.stdout) == (0, "awake\n"), woken.stderr
        assert state(sid) == "running"
        bad = bb("create", "--auto-resume", url=daemon.url)  # without --on-timeout pause: refused, clearly
        assert bad.returncode != 0 and "auto_resume needs on_timeout='pause'" in bad.stderr
    finally:
        bb("rm", sid, url=daemon.url)
