"""The ``branchbox`` CLI as a subprocess against a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from branchbox.api.auth import hash_api_key
from branchbox.sdk import Sandbox
from tests.conftest import DaemonProc, cli_env, templates_dir


def bb(*args: str, url: str | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "branchbox.cli"]
    if url is not None:
        argv += ["--url", url]
    return subprocess.run(
        argv + list(args),
        env=cli_env(COLUMNS="200"),
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
    out = bb("ls", url="http://127.0.0.1:9")
    assert out.returncode == 1
    assert "connection_error" in out.stderr
    assert "Traceback" not in out.stderr


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
