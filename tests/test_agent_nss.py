"""The agent (PID 1) resolves users by reading /etc/passwd and /etc/group itself, never through NSS (issue 22
point 3): glibc's getpwnam/getgrouplist would load the libnss_*.so that the sandbox's /etc/nsswitch.conf names
into PID 1 (the pattern of CVE-2019-14271). Through the SDK against a real daemon, with a hostile sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from branchbox import Sandbox
from branchbox.agent import users
from branchbox.sdk import BadRequestError
from tests.conftest import DaemonProc
from tests.leaks import _in_cgroup_tree

LIB = "/lib/x86_64-linux-gnu"
# a real NSS module under a new name: glibc dlopens libnss_evil.so.2 for "evil" in nsswitch.conf (any loadable
# library is mapped even when it lacks the _nss_evil_* functions; a hostile one runs its constructor in PID 1)
HOSTILE = (
    f"cp {LIB}/libnss_compat.so.2 {LIB}/libnss_evil.so.2 && "
    "printf 'passwd: evil files\\ngroup: evil files\\nshadow: evil files\\ninitgroups: evil\\n' > /etc/nsswitch.conf"
)


def _agent_maps(daemon: DaemonProc) -> list[str]:
    """The memory maps of this daemon's sandbox agents (PID 1 of each sandbox), read from the host."""
    maps = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _in_cgroup_tree(int(entry), daemon.cgroup_parent):
            continue
        try:
            if Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0] != b"branchbox-agent":
                continue
            maps.append(Path(f"/proc/{entry}/maps").read_text())
        except OSError:
            continue
    return maps


@pytest.mark.root
def test_user_lookups_never_load_the_sandboxs_nss_modules(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        setup = sbx.commands.run(
            "useradd --create-home --uid 1234 --user-group --groups audio,mail alice && groupadd -g 2345 team "
            f"&& usermod -aG team alice && {HOSTILE}"
        )
        assert setup.exit_code == 0, setup.stderr
        maps = _agent_maps(daemon)
        assert maps and all("libnss_evil" not in m for m in maps)
        for user in ("alice", "1234"):
            r = sbx.commands.run("id -u; id -g; id -G; echo $HOME $USER $LOGNAME", user=user)
            assert all("libnss_evil" not in m for m in _agent_maps(daemon)), "PID 1 mapped the sandbox's NSS module"
            assert r.exit_code == 0, r.stderr
            uid, gid, groups, env = r.stdout.splitlines()
            assert (uid, gid, env) == ("1234", "1234", "/home/alice alice alice")
            assert sorted(map(int, groups.split())) == [8, 29, 1234, 2345]  # mail, audio, alice, team
        bg = sbx.commands.run("id -u", user="alice", background=True).wait()
        assert bg.stdout == "1234\n"
        assert sbx.commands.run("id -u; id -G; echo $HOME", user="root").stdout == "0\n0\n/root\n"
        assert sbx.commands.run("id -u; id -G; echo $HOME", user="4321").stdout == "4321\n4321\n/\n"
        with pytest.raises(BadRequestError, match="unknown user 'mallory'"):
            sbx.commands.run("true", user="mallory")
        maps = _agent_maps(daemon)
        assert maps and all("libnss_evil" not in m for m in maps), "PID 1 mapped the sandbox's NSS module"


def test_the_agents_own_parser_of_passwd_and_group(tmp_path: Path) -> None:
    """glibc's files format; comments, NIS lines and malformed entries skipped; hostile files refused."""
    (tmp_path / "passwd").write_text(
        "# comment\n+nis::::::\nbroken:x:12\nbad:x:notanumber:1::/h:/bin/sh\n"
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1234:100:Alice,,,:/home/alice:/bin/bash\nnohome:x:7:7:::\n"
    )
    (tmp_path / "group").write_text("users:x:100:\naudio:x:29:bob,alice\nalice:x:1234:\nteam:x:2345:alice\n"
                                    "dup:x:29:alice\n-nis\nodd:x:oops:alice\n")  # fmt: skip
    etc = str(tmp_path)
    assert users.lookup("alice", etc) == users.User(1234, 100, [100, 29, 2345], "alice", "/home/alice")
    assert users.lookup(1234, etc) == users.lookup("1234", etc)
    assert users.lookup("root", etc) == users.User(0, 0, [0], "root", "/root")
    assert users.lookup("nohome", etc).home == "/"
    assert users.lookup(4321, etc) == users.User(4321, 4321, [4321], "4321", "/")
    for unknown in ("bob", "broken", "bad", "+nis"):
        with pytest.raises(users.UserError, match="unknown user"):
            users.lookup(unknown, etc)
    (tmp_path / "group").unlink()  # no group database: the primary group only
    assert users.lookup("alice", etc).groups == [100]
    (tmp_path / "passwd").unlink()
    os.mkfifo(tmp_path / "passwd")  # would block a reader forever
    with pytest.raises(users.UserError, match="not a regular file"):
        users.lookup("alice", etc)
    (tmp_path / "passwd").unlink()
    with open(tmp_path / "passwd", "wb") as f:
        f.truncate(users.MAX_BYTES + 1)
    with pytest.raises(users.UserError, match="larger than"):
        users.lookup("alice", etc)


def test_owner_names_of_file_entries(tmp_path: Path) -> None:
    """Names of a file's owner (envd's EntryInfo.owner/group): first entry wins, the number when there is none,
    re-read when the database changes, and a hostile database (a FIFO) gives numbers instead of blocking."""
    etc = str(tmp_path)
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1234:100::/h:/bin/sh\ntwin:x:1234:1::/:\n")
    (tmp_path / "group").write_text("# c\nusers:x:100:\nodd:x:oops:\n")
    assert users.owner_names(1234, 100, etc) == ("alice", "users")
    assert users.owner_names(0, 0, etc) == ("root", "0")
    assert users.owner_names(99, 99, etc) == ("99", "99")
    (tmp_path / "passwd").write_text("bob:x:1234:100::/h:/bin/sh\n")  # another size: read again
    assert users.owner_names(1234, 100, etc) == ("bob", "users")
    (tmp_path / "group").unlink()
    os.mkfifo(tmp_path / "group")
    assert users.owner_names(1234, 100, etc) == ("bob", "100")
