"""Workspace fetches obey the blocked ranges sandboxes have, and git connects to the address that was checked
(DNS rebinding between the check and git's own lookup changes nothing); ssh uses none of the host's keys or config.
Real git processes against the tests' git servers on loopback."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from branchbox import errors
from branchbox.workspaces import egress, mirror
from branchbox.workspaces.gitcmd import base_env
from branchbox.workspaces.testing import GitDaemon, HttpGitServer
from branchbox.workspaces.urls import RepoUrl, parse_repo_url
from tests.conftest import GIT_SERVERS
from tests.test_workspaces import git_base, git_daemon  # noqa: F401 - session fixtures shared with that module

LOOPBACK = GIT_SERVERS


def _host_address() -> str | None:
    """A non-loopback address of this host (the source address of a route outwards), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") else addr


def test_blocked_addresses() -> None:
    ip = ipaddress.ip_address
    for bad in ("127.0.0.1", "10.1.2.3", "172.20.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::"):  # fmt: skip
        assert egress.blocked(ip(bad), ()) is not None, bad
    assert egress.blocked(ip("203.0.113.7"), ()) is None  # a public address (documentation range)
    assert egress.blocked(ip("10.1.2.3"), ("10.1.0.0/16",)) is None  # allowed by the operator
    assert egress.blocked(ip("169.254.169.254"), ("10.1.0.0/16",)) is not None
    own = _host_address()
    if own is not None:  # the host's own addresses are refused even when public
        assert egress.blocked(ip(own), ()) is not None


def _repo(url: str, allow: tuple[str, ...] = ()) -> RepoUrl:
    return replace(parse_repo_url(url), allow_cidrs=allow)


async def test_fetches_from_blocked_ranges_are_refused(git_daemon: GitDaemon) -> None:  # noqa: F811
    url = git_daemon.url("repo.git")
    with pytest.raises(errors.RepositoryUrlError, match=r"resolves to 127\.0\.0\.1.*git_allow_cidrs"):
        await mirror.ls_remote(_repo(url), "main", timeout=60)
    assert len(await mirror.ls_remote(_repo(url, LOOPBACK), "main", timeout=60)) == 40  # allowed by the operator
    for bad in ("http://169.254.169.254/latest/meta-data.git", "https://10.0.0.1/x.git", "ssh://[::1]/x.git",
                "git@192.168.0.1:x.git"):  # fmt: skip
        with pytest.raises(errors.RepositoryUrlError, match="blocked range"):
            await mirror.ls_remote(_repo(bad, LOOPBACK), "main", timeout=60)


@pytest.fixture
def http_server(git_base: Path) -> Iterator[HttpGitServer]:  # noqa: F811
    server = HttpGitServer(git_base, "tok-" + secrets.token_hex(8)).start()
    try:
        yield server
    finally:
        server.stop()


async def test_git_connects_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch,
    git_daemon: GitDaemon,  # noqa: F811
    http_server: HttpGitServer,
) -> None:
    """The check resolves git.invalid to 127.0.0.1 (a fake resolver: a rebinding name answers what it likes);
    git itself could not resolve it (.invalid never resolves), so a fetch that works connected to the pinned
    address: http(s) by curl's resolve list, git:// by a URL rewrite."""
    checked: list[str] = []
    real = egress.resolve

    async def fake_resolve(host: str, port: int, allow: tuple[str, ...]) -> egress.Address:
        checked.append(host)
        return await real("127.0.0.1" if host == "git.invalid" else host, port, allow)

    monkeypatch.setattr(egress, "resolve", fake_resolve)
    git_url = f"git://git.invalid:{git_daemon.port}/repo.git"
    http_url = f"http://git:{http_server.token}@git.invalid:{http_server.port}/repo.git"
    commits = {await mirror.ls_remote(_repo(u, LOOPBACK), "main", timeout=60) for u in (git_url, http_url)}
    assert len(commits) == 1 and len(commits.pop()) == 40
    assert checked == ["git.invalid", "git.invalid"]
    with pytest.raises(errors.RepositoryUrlError):  # the same name, checked without the operator's allowance
        await mirror.ls_remote(_repo(git_url), "main", timeout=60)


def test_ssh_uses_no_host_keys_agent_or_config() -> None:
    """ssh -G prints the configuration ssh would use: none of the host's (or root's) files, keys or agent."""
    assert base_env()["GIT_SSH_COMMAND"].startswith("ssh -F /dev/null ")
    argv = egress.ssh_command("git.example.test", "203.0.113.9").split()
    out = subprocess.run([*argv, "-G", "git.example.test"], capture_output=True, text=True, check=True).stdout
    conf = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert conf["hostname"] == "203.0.113.9" and conf["hostkeyalias"] == "git.example.test"
    assert conf["identityfile"] == "none" and conf["identityagent"] == "none" and conf["identitiesonly"] == "yes"
    assert conf["userknownhostsfile"] == "/dev/null" and conf["globalknownhostsfile"] == "/dev/null"
    assert conf["batchmode"] == "yes" and conf["forwardagent"] == "no"
    assert "proxycommand" not in conf and "proxyjump" not in conf
