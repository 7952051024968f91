"""Users inside a sandbox (issue 22 point 0), reached as a user reaches them: the SDK against a real daemon.

The sandbox's gid map is written by host root without ``setgroups = deny``, so the agent's ``user=`` (which
calls setgroups before setuid) and ``su``, ``runuser`` and ``setpriv`` inside the sandbox all work. ``sudo`` is
not in the default template (a template that installs it gets a working one: the same setgroups call)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from branchbox import Sandbox
from tests.conftest import DaemonProc, vm_cache

pytestmark = [pytest.mark.root]


def _run(sbx: Sandbox, cmd: str, **kw: object) -> str:
    res = sbx.commands.run(cmd, **kw)  # type: ignore[call-overload]
    assert res.exit_code == 0, (cmd, res.stdout, res.stderr)
    return str(res.stdout).strip()


def test_setgroups_is_allowed_in_the_sandbox(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        assert _run(sbx, "cat /proc/self/setgroups") == "allow"
        # root inside may change its own supplementary groups (what su/login/sshd do first)
        assert _run(sbx, "setpriv --groups 4,24 id -G") == "0 4 24"


def test_run_as_users_foreground_background_and_pty(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        assert _run(sbx, "id -u", user="root") == "0"
        assert _run(sbx, "id -un; id -g", user="nobody") == "nobody\n65534"
        assert _run(sbx, "id -u", user="0") == "0"
        _run(sbx, "useradd --create-home --uid 1234 --user-group --groups audio agent")
        assert _run(sbx, "id -un; id -u; id -Gn; echo $HOME", user="agent").split("\n") == [
            "agent",
            "1234",
            "agent audio",
            "/home/agent",
        ]
        # what the user writes is theirs
        _run(sbx, "echo hi > /home/agent/f", user="agent")
        assert _run(sbx, "stat -c %U:%G /home/agent/f") == "agent:agent"
        denied = sbx.commands.run("touch /root/x", user="agent")
        assert denied.exit_code != 0
        assert "Permission denied" in denied.stderr

        bg = sbx.commands.run("id -un; id -G", user="agent", background=True)
        res = bg.wait()
        assert res.exit_code == 0
        assert res.stdout.split() == ["agent", "1234", "29"]

        term = sbx.pty.create(user="agent", cmd=["/bin/sh"])
        term.send_input("echo who-$(id -un)-$(id -u)\nexit 3\n")
        out = term.wait(timeout=60)
        assert out.exit_code == 3
        assert "who-agent-1234" in out.stdout


def test_su_runuser_setpriv_inside(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        _run(sbx, "useradd --create-home --uid 1500 --shell /bin/bash dev")
        assert _run(sbx, "su dev -c 'id -un; id -u'") == "dev\n1500"
        assert _run(sbx, "su - dev -c 'echo $HOME; pwd'") == "/home/dev\n/home/dev"
        assert _run(sbx, "runuser -u dev -- id -u") == "1500"
        assert _run(sbx, "runuser -l dev -c 'id -un'") == "dev"
        assert _run(sbx, "setpriv --reuid 1500 --regid 1500 --clear-groups id") == (
            "uid=1500(dev) gid=1500(dev) groups=1500(dev)"
        )
        assert _run(sbx, "setpriv --reuid 1500 --regid 1500 --init-groups id -un") == "dev"
        # a non-root user cannot become root by su (root has no password; sudo is tests/test_uid_ranges.py's)
        back = sbx.commands.run("su root -c id < /dev/null", user="dev")
        assert back.exit_code != 0


@pytest.mark.microvm
def test_users_in_a_microvm(daemon_factory: Any) -> None:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (make apt installs qemu-system-x86)")
    d = daemon_factory(env={"BRANCHBOX_VM_CACHE": str(vm_cache())})
    # the first VM of a fresh cache boots a memory template under TCG: minutes on a loaded host
    with Sandbox.create(base_url=d.url, backend="microvm", memory_mb=256, request_timeout=900) as sbx:
        assert _run(sbx, "cat /proc/self/setgroups") == "allow"
        assert _run(sbx, "id -un; id -g", user="nobody") == "nobody\n65534"
        _run(sbx, "useradd --create-home --uid 1234 --user-group --groups audio agent")
        assert _run(sbx, "id -un; id -Gn", user="agent") == "agent\nagent audio"
        bg = sbx.commands.run("id -u", user="agent", background=True).wait()
        assert bg.stdout.strip() == "1234"
        term = sbx.pty.create(user="agent", cmd=["/bin/sh"])
        term.send_input("echo who-$(id -un)\nexit\n")
        assert "who-agent" in term.wait(timeout=120).stdout
        assert _run(sbx, "su agent -c 'id -un'") == "agent"
        assert _run(sbx, "runuser -u agent -- id -u") == "1234"
        assert _run(sbx, "setpriv --reuid 1234 --regid 1234 --init-groups id -Gn") == "agent audio"
