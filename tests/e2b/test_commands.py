"""Commands and PTYs through the unmodified e2b SDK (sync and async) against a real daemon."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator

import pytest
from e2b.exceptions import InvalidArgumentException, SandboxNotRunningException, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize

from e2b import AsyncSandbox, CommandExitException, Sandbox
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def asbx(e2b_env: E2BDaemon) -> AsyncIterator[AsyncSandbox]:
    s = await AsyncSandbox.create("default", timeout=300)
    yield s
    await AsyncSandbox.kill(s.sandbox_id)


def _gone(sbx: Sandbox, pid: int) -> bool:
    """Whether ``pid`` left the process list (the agent kills at the deadline the client gave up at: a few ms)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if pid not in [p.pid for p in sbx.commands.list()]:
            return True
        time.sleep(0.05)
    return False


def test_run_foreground(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code, r.error) == ("out\n", "err\n", 0, None)
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
    assert (info.value.exit_code, info.value.stdout, info.value.stderr) == (3, "partial\n", "bad\n")
    r = sbx.commands.run("pwd; echo $A-$B; id -un", cwd="/tmp", envs={"A": "1", "B": "two words"}, user="root")
    assert r.stdout == "/tmp\n1-two words\nroot\n"
    # a login bash runs each command, as envd does
    assert sbx.commands.run("echo $0; shopt -q login_shell && echo login").stdout == "/bin/bash\nlogin\n"
    big = sbx.commands.run("head -c 3000000 /dev/zero | tr '\\0' x")
    assert big.stdout == "x" * 3_000_000


def test_streaming_callbacks(sbx: Sandbox) -> None:
    seen: list[tuple[str, str, float]] = []
    sbx.commands.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.2; done",
        on_stdout=lambda s: seen.append(("out", s, time.monotonic())),
        on_stderr=lambda s: seen.append(("err", s, time.monotonic())),
    )
    assert "".join(s for k, s, _ in seen if k == "out") == "o1\no2\no3\n"
    assert "".join(s for k, s, _ in seen if k == "err") == "e1\ne2\ne3\n"
    outs = [t for k, s, t in seen if k == "out"]
    assert outs == sorted(outs) and len(outs) == 3  # three chunks as they came, not one at the end


def test_timeout_kills_and_ends_with_deadline(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 60", timeout=1)
    stuck = [p.pid for p in sbx.commands.list() if p.args[-1:] == ["sleep 60"]]
    assert all(_gone(sbx, pid) for pid in stuck)
    h = sbx.commands.run("sleep 60", background=True, timeout=1)
    with pytest.raises(TimeoutException):
        h.wait()
    assert _gone(sbx, h.pid)


def test_background_wait_kill_list_stdin(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat", background=True, stdin=True)
    listed = {p.pid: p for p in sbx.commands.list()}
    assert listed[h.pid].cmd == "/bin/bash" and listed[h.pid].args == ["-l", "-c", "cat"]
    sbx.commands.send_stdin(h.pid, "hello\n")
    h.send_stdin("again\n")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "hello\nagain\n"

    h = sbx.commands.run("sleep 100", background=True)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as info:
        h.wait()
    assert info.value.exit_code == -1
    assert sbx.commands.kill(h.pid) is False  # not running any more
    assert sbx.commands.kill(999_999) is False


def test_stream_input(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, ["one\n", b"two\n"])  # one client-streaming call, input in order
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "one\ntwo\n"


def test_process_outlives_its_stream_and_connect(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    h.disconnect()  # the stream ends; the process keeps running
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "while away\n")  # no stream holds it: a short attach carries the input
    again = sbx.commands.connect(h.pid)
    sbx.commands.send_stdin(h.pid, "after\n")
    sbx.commands.close_stdin(h.pid)
    result = again.wait()
    assert result.stdout.endswith("after\ndone\n") and "while away\n" in result.stdout
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_sandbox_killed_mid_command(e2b_env: E2BDaemon) -> None:
    sbx = Sandbox.create("default", timeout=120)
    h = sbx.commands.run("echo started; sleep 100", background=True)
    threading.Timer(0.5, lambda: Sandbox.kill(sbx.sandbox_id)).start()
    with pytest.raises(SandboxNotRunningException):
        h.wait()
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo too late")


def test_pty(sbx: Sandbox) -> None:
    out: list[bytes] = []
    h = sbx.pty.create(PtySize(rows=24, cols=100), cwd="/tmp", envs={"X": "from-env"})
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=120))
    sbx.pty.send_stdin(h.pid, b"echo $X; pwd; stty size; exit 7\n")
    with pytest.raises(CommandExitException) as info:
        h.wait(on_pty=out.append)
    assert info.value.exit_code == 7
    text = b"".join(out).replace(b"\r", b"")
    assert b"from-env\n/tmp\n30 120\n" in text
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(h.pid) is True


async def test_async_commands(asbx: AsyncSandbox) -> None:
    chunks: list[str] = []
    r = await asbx.commands.run("echo a; sleep 0.1; echo b", on_stdout=chunks.append, envs={"Z": "1"})
    assert r.stdout == "a\nb\n" and "".join(chunks) == "a\nb\n"
    with pytest.raises(CommandExitException) as info:
        await asbx.commands.run("exit 5")
    assert info.value.exit_code == 5
    h = await asbx.commands.run("cat", background=True, stdin=True)
    assert h.pid in [p.pid for p in await asbx.commands.list()]
    await asbx.commands.send_stdin(h.pid, "x\n")
    await asbx.commands.close_stdin(h.pid)
    assert (await h.wait()).stdout == "x\n"
    h = await asbx.commands.run("sleep 100", background=True)
    assert await asbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        await h.wait()
    with pytest.raises(TimeoutException):
        await asbx.commands.run("sleep 60", timeout=1)
    out: list[bytes] = []
    p = await asbx.pty.create(PtySize(rows=24, cols=80), on_data=out.append)
    await asbx.pty.send_stdin(p.pid, b"echo pty-ok; exit\n")
    await p.wait()
    assert b"pty-ok\r\n" in b"".join(out)


def test_users(sbx: Sandbox) -> None:
    # the default template has no useradd (minbase): a user by hand
    sbx.commands.run(
        "echo 'alice:x:1001:1001::/home/alice:/bin/bash' >> /etc/passwd && echo 'alice:x:1001:' >> /etc/group"
        " && mkdir -p /home/alice && chown 1001:1001 /home/alice"
    )
    assert sbx.commands.run("id -un; echo $HOME", user="alice").stdout == "alice\n/home/alice\n"
    # a relative path is under the user's home, and what is written for a user is theirs (as envd does)
    assert sbx.files.write("notes.txt", "one\n", user="alice").path == "/home/alice/notes.txt"
    assert sbx.files.make_dir("proj", user="alice") is True
    sbx.commands.run("echo two >> notes.txt && touch proj/x", user="alice", cwd="/home/alice")
    assert sbx.files.read("notes.txt", user="alice") == "one\ntwo\n"
    owners = sbx.commands.run("stat -c %U /home/alice/notes.txt /home/alice/proj").stdout
    assert owners == "alice\nalice\n"
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("true", user="nobody-here")


def test_base_template_is_what_e2b_code_expects(e2b_env: E2BDaemon, base_template: object) -> None:
    with Sandbox.create("base", timeout=120) as sbx:
        assert sbx.commands.run("id -un; pwd; echo $HOME").stdout == "user\n/home/user\n/home/user\n"
        # root is one user= away, and sudo without password (the sandbox has a uid range of its own: docs/e2b.md)
        assert sbx.commands.run("id -un", user="root").stdout == "root\n"
        assert "user ALL=(ALL:ALL) NOPASSWD: ALL" in sbx.files.read("/etc/sudoers.d/user", user="root")
        assert sbx.commands.run("sudo -n id -un; id -un").stdout == "root\nuser\n"
        assert sbx.commands.run("sudo -n id -u", user="user").stdout == "0\n"
        done = sbx.commands.run("sudo -n touch /root/x && sudo -n stat -c %U /root/x && sudo -n apt-get --version")
        assert done.stdout.startswith("root\napt ")
        assert sbx.commands.run("stat -c %U /root/x", user="root").stdout == "root\n"
        info = sbx.files.write("hello.txt", "hi")
        assert info.path == "/home/user/hello.txt"
        got = sbx.files.get_info("hello.txt")
        assert (got.owner, got.group) == ("user", "user")  # envd's EntryInfo: the names of the sandbox's owner
        assert sbx.commands.run("stat -c %U hello.txt && echo more >> hello.txt && cat hello.txt").stdout == (
            "user\nhimore\n"
        )
