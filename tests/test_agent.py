"""The real agent (a subprocess running a copy of the bbagent package, as a sandbox does) via AgentClient."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import branchbox.agent
from branchbox.agent import handlers, shell, wire
from branchbox.agentclient.client import AgentClient, OutputChunk, ProcessExit, ProcessHandle
from branchbox.errors import (
    AgentDisconnectedError,
    BadRequestError,
    ConflictError,
    FileExistsInSandboxError,
    FileNotFoundInSandboxError,
    InvalidPathError,
    IsADirectoryInSandboxError,
    NotADirectoryInSandboxError,
    ProcessNotFoundError,
    TimeoutError_,
)

AGENT_SRC = Path(branchbox.agent.__file__).parent
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
BOOT = "import sys;sys.path[:0]=[{dir!r}];from bbagent.server import main;main()"
GUARD = 60  # seconds: only a hang guard, never asserted on


@dataclass
class RunningAgent:
    proc: subprocess.Popen[bytes]
    socket: Path
    workdir: Path
    pid1: bool = False
    clients: list[AgentClient] = field(default_factory=list)

    async def client(self) -> AgentClient:
        c = await AgentClient.connect(self.socket, timeout=GUARD)
        self.clients.append(c)
        return c

    def agent_pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., RunningAgent]]:
    """Start agents exactly as a sandbox does: a copied bbagent package, a listening socket as an fd."""
    started: list[RunningAgent] = []

    def start(*, prefix: tuple[str, ...] = (), oom_adj: int | None = None) -> RunningAgent:
        base = tmp_path / f"agent{len(started)}"
        pkg = base / "code" / "bbagent"
        pkg.mkdir(parents=True)
        for name in branchbox.agent.FILES:
            shutil.copy(AGENT_SRC / name, pkg / name)
        workdir = base / "work"
        workdir.mkdir()
        sock_path = base / "agent.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(sock_path))
        sock.listen(64)

        def preexec() -> None:
            if oom_adj is not None:
                Path("/proc/self/oom_score_adj").write_text(str(oom_adj))

        env = {
            "BRANCHBOX_LISTEN_FD": str(sock.fileno()),
            "BRANCHBOX_ENV": '{"PATH": "/usr/local/bin:/usr/bin:/bin", "BASE": "base", "OVER": "base"}',
            "BRANCHBOX_WORKDIR": str(workdir),
        }
        cmd = [*prefix, PYTHON, "-I", "-S", "-B", "-c", BOOT.format(dir=str(base / "code"))]
        try:
            proc = subprocess.Popen(
                cmd,
                pass_fds=(sock.fileno(),),
                env=env,
                preexec_fn=preexec if oom_adj is not None else None,  # noqa: PLW1509
            )
        finally:
            sock.close()
        agent = RunningAgent(proc, sock_path, workdir, pid1=bool(prefix))
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            if agent.pid1:
                agent.proc.kill()  # unshare --kill-child then SIGKILLs the agent and so its pid namespace
            else:
                agent.proc.terminate()  # the agent SIGKILLs its process groups and exits
            try:
                agent.proc.wait(10)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
        agent.proc.wait()


@pytest.fixture
async def agent(agent_factory: Callable[..., RunningAgent]) -> RunningAgent:
    return agent_factory()


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    c = await agent.client()
    try:
        yield c
    finally:
        await c.aclose()


async def read_until(handle: ProcessHandle, needle: bytes, seen: bytearray) -> None:
    """Read output into ``seen`` until ``needle`` appears (the hang guard fails the test otherwise)."""
    async with asyncio.timeout(GUARD):
        while needle not in seen:
            item = await handle.__anext__()
            assert isinstance(item, OutputChunk), f"process ended before {needle!r}: {bytes(seen)!r}"
            seen += item.data


async def wait_gone(client: AgentClient, pid: int) -> None:
    """Blocks inside the sandbox until ``pid`` no longer exists (fails with a timeout if it never goes)."""
    res = await client.exec(["sh", "-c", f"while [ -e /proc/{pid} ]; do sleep 0.01; done"], timeout=GUARD)
    assert res.exit_code == 0


# -- basics -------------------------------------------------------------------------------------------


async def test_hello_and_ping(client: AgentClient, agent: RunningAgent) -> None:
    assert client.hello["protocol"] == 1
    assert client.hello["pid"] == agent.agent_pid()
    assert "exec" in client.hello["methods"]  # type: ignore[operator]
    assert await client.ping() > 0


async def test_unknown_method_is_bad_request(client: AgentClient) -> None:
    with pytest.raises(BadRequestError, match="unknown method"):
        await client._request("no.such.method", {})
    with pytest.raises(BadRequestError):
        await client._request("exec", {"cmd": 42})
    assert await client.ping() > 0


async def test_raw_protocol_duplicate_channel_and_garbage(agent: RunningAgent) -> None:
    reader, writer = await asyncio.open_unix_connection(str(agent.socket))
    parser = wire.FrameParser()

    async def frame() -> wire.Frame:
        while True:
            if pending:
                return pending.pop(0)
            data = await reader.read(65536)
            assert data, "agent closed the connection"
            pending.extend(parser.feed(data))

    pending: list[wire.Frame] = []
    try:
        assert (await frame())[0] == wire.HELLO
        call = {"method": "exec", "params": {"cmd": ["sleep", "1000"]}}
        writer.write(wire.encode_json(wire.CALL, 5, call) + wire.encode_json(wire.CALL, 5, call))
        kind, channel, payload = await frame()
        assert (kind, channel) == (wire.RESULT, 5)
        assert wire.decode_json(payload)["error"]["code"] == "bad_request"
        writer.write(wire.encode_cancel(5))  # the first call is still there: CANCEL kills it
        kind, channel, payload = await frame()
        assert (kind, channel) == (wire.RESULT, 5)
        assert wire.decode_json(payload)["result"]["signal"] == 9
        writer.write(wire.HEADER.pack(5, 42, 1) + b"hello")  # unknown kind: the agent drops the connection
        assert await reader.read() == b""
    finally:
        writer.close()
    c = await agent.client()  # the agent still serves new connections
    assert await c.ping() > 0
    await c.aclose()


def test_simple_command_detection() -> None:
    simple = shell.is_simple_command
    assert simple("ls -la /tmp")
    assert simple("python3 -m http.server 8000")
    assert simple("  git commit -m x  ")
    assert not simple("echo hi")  # builtin
    assert not simple("cd /tmp")
    assert not simple("FOO=1 env")
    assert not simple("ls *.py")
    assert not simple("cat a | wc -l")
    assert not simple("echo $HOME")
    assert not simple("if true")
    assert not simple("ls 'a b'")
    assert not simple("")
    assert shell.shell_argv("ls -l") == ["ls", "-l"]
    assert shell.shell_argv("echo a && echo b")[1:] == ["-c", "echo a && echo b"]


def test_host_files_name_the_sandbox_and_keep_a_templates_own_hosts(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hostname").write_text("buildhost\n")  # what mmdebstrap copies from the build host; no /etc/hosts
    handlers.write_host_files("bb-one", str(etc))
    hosts = (etc / "hosts").read_text()
    assert (etc / "hostname").read_text() == "bb-one\n"
    assert "127.0.0.1\tlocalhost\n" in hosts and "::1\tlocalhost" in hosts and "127.0.1.1\tbb-one\n" in hosts
    assert (etc / "hosts").stat().st_mode & 0o777 == 0o644
    handlers.write_host_files("bb-two", str(etc))  # ours: rewritten for the new name (a fork, a rename)
    assert "bb-one" not in (etc / "hosts").read_text() and "\tbb-two\n" in (etc / "hosts").read_text()
    (etc / "hosts").write_text("10.0.0.7 db\n")  # the template's own: kept
    handlers.write_host_files("bb-three", str(etc))
    assert (etc / "hosts").read_text() == "10.0.0.7 db\n" and (etc / "hostname").read_text() == "bb-three\n"
    (etc / "hosts").write_text("")  # empty, as a docker export leaves it: ours
    handlers.write_host_files("bb-four", str(etc))
    assert "\tbb-four\n" in (etc / "hosts").read_text()
    assert sorted(p.name for p in etc.iterdir()) == ["hostname", "hosts"]  # nothing else written
    (etc / "hostname").unlink()
    (etc / "hostname").symlink_to(tmp_path / "elsewhere")
    handlers.write_host_files("bb-five", str(etc))  # never written through a link
    assert not (tmp_path / "elsewhere").exists()


def test_builtins_with_a_program_twin_skip_the_shell(tmp_path: Path) -> None:
    """true/false/echo run as programs when they exist on PATH and mean the same; otherwise the shell runs them."""
    argv = shell.shell_argv
    assert argv("true") == ["true"]
    assert argv("echo hello world") == ["echo", "hello", "world"]
    assert argv("echo --help")[1] == "-c"  # coreutils echo would print its help
    assert argv("true x")[1] == "-c"  # coreutils true parses --help/--version
    assert argv("echo $HOME")[1] == "-c"
    assert argv("cd /tmp")[1] == "-c"
    assert argv("true", str(tmp_path))[1] == "-c"  # no such program on this PATH


# -- exec ---------------------------------------------------------------------------------------------


async def test_exec_argv_and_exit_codes(client: AgentClient) -> None:
    ok = await client.exec(["true"])
    assert (ok.exit_code, ok.signal, ok.stdout, ok.stderr) == (0, None, b"", b"")
    res = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (res.exit_code, res.stdout, res.stderr) == (7, b"out\n", b"err\n")


async def test_exec_shell_string_and_direct(client: AgentClient) -> None:
    res = await client.exec("echo a | tr a b; echo $BASE")
    assert res.stdout == b"b\nbase\n"
    direct = await client.exec("env")  # simple: exec'd without a shell, so no shell variables appear
    lines = set(direct.stdout.decode().splitlines())
    assert lines == {"PATH=/usr/local/bin:/usr/bin:/bin", "BASE=base", "OVER=base"}


async def test_exec_env_merges_over_base_and_cwd(client: AgentClient, agent: RunningAgent) -> None:
    res = await client.exec(["sh", "-c", 'echo "$BASE $OVER $NEW"; pwd'], env={"OVER": "call", "NEW": "n"})
    assert res.stdout.decode() == f"base call n\n{agent.workdir}\n"
    (agent.workdir / "sub").mkdir()
    res = await client.exec(["pwd"], cwd="sub")
    assert res.stdout.decode() == f"{agent.workdir}/sub\n"
    res = await client.exec(["pwd"], cwd="/")
    assert res.stdout == b"/\n"


async def test_exec_bad_cwd_and_missing_command(client: AgentClient, agent: RunningAgent) -> None:
    with pytest.raises(FileNotFoundInSandboxError):
        await client.exec(["true"], cwd="/no/such/dir")
    (agent.workdir / "f").write_text("x")
    with pytest.raises(NotADirectoryInSandboxError):
        await client.exec(["true"], cwd="f")
    res = await client.exec(["no-such-command-xyz", "a"])
    assert res.exit_code == 127
    assert b"command not found" in res.stderr
    res = await client.exec("no-such-command-xyz && echo never")
    assert res.exit_code == 127
    with pytest.raises(InvalidPathError):
        await client.exec(["true"], cwd="../../../../../../../../../../..")


async def test_exec_child_gets_only_stdio_and_default_signals(client: AgentClient) -> None:
    """The plain spawn (posix_spawn) gives a child what Popen(close_fds=True, restore_signals=True) gives: no
    descriptor of the agent's (its listening socket came in inheritable), nothing ignored or blocked."""
    script = "import os; print(*[fd for fd in range(3, 1024) if os.path.exists(f'/proc/self/fd/{fd}')])"
    res = await client.exec([PYTHON, "-I", "-S", "-c", script])
    assert (res.exit_code, res.stdout) == (0, b"\n")
    masks = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]
    res = await client.exec(masks)
    blocked, ignored = (int(v, 16) for v in res.stdout.split()[1::2])
    assert blocked == 0
    # the agent inherited our dispositions (Python ignores SIGPIPE and SIGXFSZ): a child gets Popen's, except that
    # glibc's posix_spawn leaves its two internal signals (32, 33) ignored, which glibc programs take back (and
    # which may come ignored from whatever started the tests, too)
    internal = 0b11 << 31
    popen = int(subprocess.run(masks, capture_output=True, check=True).stdout.split()[3], 16)
    assert ignored & ~internal == popen & ~internal
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    res = await client.exec(["sh", "-c", "ps -o sid= -p $$ 2>/dev/null || cut -d' ' -f6 /proc/$$/stat; echo $$"])
    sid, pid = res.stdout.split()
    assert sid == pid  # a session (and process group) of its own


async def test_exec_finds_the_program_on_the_call_path(client: AgentClient, agent: RunningAgent) -> None:
    """Looked up on the PATH the call runs with, after the cwd: a non-executable or directory entry is skipped."""
    first, second = agent.workdir / "first", agent.workdir / "second"
    for d in (first, second):
        d.mkdir()
    (first / "tool").write_text("#!/bin/sh\necho not executable\n")
    (second / "tool").mkdir()
    third = agent.workdir / "third"
    third.mkdir()
    (third / "tool").write_text('#!/bin/sh\necho third $0 "$@"\n')
    (third / "tool").chmod(0o755)
    path = f"{first}:{second}:third:/usr/bin:/bin"
    res = await client.exec(["tool", "a b"], env={"PATH": path})
    assert (res.exit_code, res.stdout) == (0, b"third third/tool a b\n")  # $0: the path exec ran, as execvp gives
    res = await client.exec(["tool"], env={"PATH": path}, cwd="/")  # "third" is relative to the cwd
    assert (res.exit_code, res.stderr) == (126, b"branchbox: tool: Permission denied\n")  # as a shell: first/tool
    res = await client.exec(["./third/tool"])
    assert res.stdout == b"third ./third/tool\n"


async def test_exec_stdin(client: AgentClient) -> None:
    res = await client.exec(["cat"], stdin=b"hello\x00\xff")
    assert res.stdout == b"hello\x00\xff"
    empty = await client.exec(["cat"], stdin=b"")
    assert empty.stdout == b""
    devnull = await client.exec(["cat"])  # no stdin: /dev/null, so cat ends at once
    assert devnull.exit_code == 0
    big = os.urandom(1 << 20) * 12  # above the flow-control window in both directions
    res = await client.exec(["cat"], stdin=big)
    assert len(res.stdout) == len(big)
    assert res.stdout == big


async def test_exec_large_output_streams(client: AgentClient) -> None:
    seen: list[int] = []
    res = await client.exec(["head", "-c", "20000000", "/dev/zero"], on_stdout=lambda b: seen.append(len(b)))
    assert len(res.stdout) == 20_000_000
    assert sum(seen) == 20_000_000
    assert len(seen) > 1


async def test_exec_keeps_at_most_max_output_per_stream(client: AgentClient) -> None:
    """The result keeps the first ``max_output`` bytes of each stream; the rest is drained to the exit."""
    seen: list[int] = []
    cmd = ["sh", "-c", "head -c 9000000 /dev/zero; echo err >&2; exit 3"]
    res = await client.exec(cmd, max_output=5_000_000, on_stdout=lambda b: seen.append(len(b)))
    assert (res.exit_code, len(res.stdout), res.stdout_truncated) == (3, 5_000_000, True)
    assert (res.stderr, res.stderr_truncated) == (b"err\n", False)
    assert sum(seen) == 9_000_000  # a callback still gets everything
    exact = await client.exec(["head", "-c", "1000", "/dev/zero"], max_output=1000)
    assert (len(exact.stdout), exact.stdout_truncated) == (1000, False)


async def test_agent_cuts_off_a_host_that_ignores_its_window(agent: RunningAgent) -> None:
    """A host sending stdin beyond the credit the agent granted (to a process that does not read) is cut off
    with a protocol error instead of being buffered; the agent keeps serving other connections."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, str(agent.socket))
    try:
        parser = wire.FrameParser()
        async with asyncio.timeout(GUARD):
            while not parser.feed(await loop.sock_recv(sock, 65536)):  # HELLO
                pass
            call = {"method": "exec", "params": {"cmd": ["sleep", "60"], "stdin": True}}
            await loop.sock_sendall(sock, wire.encode_json(wire.CALL, 1, call))
            chunk = b"x" * wire.CHUNK_SIZE
            sent = 0
            with contextlib.suppress(OSError):  # the agent may cut us off while we still send
                while sent <= wire.INITIAL_WINDOW:
                    await loop.sock_sendall(sock, wire.encode_data(1, wire.STDIN, chunk))
                    sent += len(chunk)
            with contextlib.suppress(OSError):  # ECONNRESET counts as cut off too
                while await loop.sock_recv(sock, 65536):  # until the agent closes (the guard fails the test)
                    pass
    finally:
        sock.close()
    c = await agent.client()
    assert (await c.exec(["echo", "still serving"])).stdout == b"still serving\n"
    await c.aclose()


async def test_client_cuts_off_an_agent_that_ignores_its_window(tmp_path: Path) -> None:
    """An agent (a sandbox's PID 1 may be hostile) sending a download beyond the host's credit while nobody reads
    it is cut off with a protocol error, instead of growing the daemon's memory."""
    path = tmp_path / "fake.sock"
    served = asyncio.Event()

    async def fake_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = {"protocol": wire.PROTOCOL_VERSION, "methods": ["files.read"]}
            writer.write(wire.encode_json(wire.HELLO, 0, hello))
            parser = wire.FrameParser()
            while not (frames := parser.feed(await reader.read(65536))):
                pass
            channel = frames[0][1]
            for _ in range(wire.INITIAL_WINDOW // wire.CHUNK_SIZE + 1):  # one chunk more than the credit
                writer.write(wire.encode_data(channel, wire.STDOUT, b"y" * wire.CHUNK_SIZE))
            with contextlib.suppress(OSError):
                await writer.drain()
                await reader.read()  # until the client hangs up
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            served.set()

    server = await asyncio.start_unix_server(fake_agent, str(path))
    try:
        c = await AgentClient.connect(path, timeout=GUARD)
        chunks = aiter(c.download("/big"))
        async with asyncio.timeout(GUARD):
            assert await anext(chunks) == b"y" * wire.CHUNK_SIZE  # then the reader stalls
            await c.wait_closed()
            with pytest.raises(AgentDisconnectedError, match="beyond its window"):
                async for _ in chunks:
                    pass
        await c.aclose()
        await served.wait()
    finally:
        server.close()
        await server.wait_closed()


async def test_exec_invalid_utf8_is_bytes(client: AgentClient) -> None:
    res = await client.exec(["printf", "\\377\\376ok\\200"])
    assert res.stdout == b"\xff\xfeok\x80"
    res = await client.exec(["sh", "-c", "printf '\\351' >&2"])
    assert res.stderr == b"\xe9"


async def test_exec_killed_by_signal(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "kill -TERM $$"])
    assert (res.exit_code, res.signal) == (128 + signal.SIGTERM, signal.SIGTERM)


async def test_exec_timeout_kills_the_group(client: AgentClient, agent: RunningAgent) -> None:
    pidfile = agent.workdir / "child.pid"
    with pytest.raises(TimeoutError_) as info:
        await client.exec(["sh", "-c", f"echo partial; sleep 1000 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert info.value.details["stdout_bytes"] == len(b"partial\n")
    assert info.value.details["stderr_bytes"] == 0
    await wait_gone(client, int(pidfile.read_text()))


async def test_cancelled_exec_kills_process(client: AgentClient, agent: RunningAgent) -> None:
    pidfile = agent.workdir / "p.pid"
    task = asyncio.create_task(
        client.exec(["sh", "-c", f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; sleep 1000"])
    )
    async with asyncio.timeout(GUARD):
        res = await client.exec(["sh", "-c", f"while [ ! -e {pidfile} ]; do sleep 0.01; done"])
    assert res.exit_code == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(client, int(pidfile.read_text()))


async def test_failing_callback_fails_only_its_call(client: AgentClient) -> None:
    def boom(data: bytes) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        await client.exec(["echo", "x"], on_stdout=boom)
    assert (await client.exec(["echo", "y"])).stdout == b"y\n"


async def test_50_concurrent_execs(client: AgentClient) -> None:
    results = await asyncio.gather(
        *(client.exec(["sh", "-c", 'echo "$0"; echo "e$0" >&2; exit $(($0 % 5))', str(i)]) for i in range(50))
    )
    for i, res in enumerate(results):
        assert res.stdout == f"{i}\n".encode()
        assert res.stderr == f"e{i}\n".encode()
        assert res.exit_code == i % 5


@pytest.mark.root
async def test_exec_as_user(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", 'id -u; id -g; echo "$HOME $USER"'], user="nobody", cwd="/")
    uid, gid, rest = res.stdout.decode().splitlines()
    assert (uid, gid) == ("65534", "65534")
    assert rest.endswith(" nobody")
    res = await client.exec(["id", "-u"], user="1234", cwd="/")
    assert res.stdout == b"1234\n"
    with pytest.raises(BadRequestError, match="unknown user"):
        await client.exec(["true"], user="no-such-user-xyz")


@pytest.mark.root
async def test_children_get_oom_score_adj_zero(agent_factory: Callable[..., RunningAgent]) -> None:
    # production gives the agent a negative value; 500 exercises the same reset without CAP_SYS_RESOURCE
    agent = agent_factory(oom_adj=500)
    c = await agent.client()
    assert Path(f"/proc/{agent.agent_pid()}/oom_score_adj").read_text().strip() == "500"
    res = await c.exec(["cat", "/proc/self/oom_score_adj"])
    assert res.stdout == b"0\n"
    res = await c.exec(["cat", "/proc/self/oom_score_adj"], user="nobody", cwd="/")  # via preexec
    assert res.stdout == b"0\n"
    res = await c.exec("sh -c 'cat /proc/$$/oom_score_adj'")
    assert res.stdout == b"0\n"
    assert Path(f"/proc/{agent.agent_pid()}/oom_score_adj").read_text().strip() == "500"  # restored
    await c.aclose()


# -- background processes -----------------------------------------------------------------------------


async def test_spawn_list_attach_detach_kill(client: AgentClient) -> None:
    handle = await client.spawn(["sh", "-c", "echo start; echo warn >&2; exec sleep 1000"], tag="svc")
    seen = bytearray()
    await read_until(handle, b"start\n", seen)
    procs = {p.pid: p for p in await client.list_processes()}
    info = procs[handle.pid]
    assert (info.tag, info.running, info.exit_code, info.pty) == ("svc", True, None, False)
    assert info.cmd == ["sh", "-c", "echo start; echo warn >&2; exec sleep 1000"]
    await handle.detach()
    again = await client.attach(handle.pid)
    tail = bytearray()
    await read_until(again, b"warn\n", tail)
    assert b"start\n" in tail
    await again.kill(signal.SIGKILL)
    exit_ = await again.wait()
    assert exit_ == ProcessExit(128 + 9, 9)
    info = {p.pid: p for p in await client.list_processes()}[handle.pid]
    assert (info.running, info.exit_code) == (False, 137)
    # an exited process can still be attached: tail, then its exit
    late = await client.attach(handle.pid)
    items = [item async for item in late]
    assert items[-1] == ProcessExit(137, 9)
    assert b"start" in b"".join(i.data for i in items if isinstance(i, OutputChunk))


async def test_spawn_exit_code_and_streams(client: AgentClient) -> None:
    handle = await client.spawn(["sh", "-c", "echo o; echo e >&2; exit 3"])
    items = [item async for item in handle]
    out = b"".join(i.data for i in items if isinstance(i, OutputChunk) and i.stream == "stdout")
    err = b"".join(i.data for i in items if isinstance(i, OutputChunk) and i.stream == "stderr")
    assert (out, err, items[-1]) == (b"o\n", b"e\n", ProcessExit(3, None))
    assert handle.exit == ProcessExit(3, None)


async def test_spawn_errors(client: AgentClient) -> None:
    with pytest.raises(FileNotFoundInSandboxError):
        await client.spawn(["no-such-command-xyz"])  # an argv: no process to give a pid to


async def test_a_command_line_whose_program_cannot_run_is_the_shells_to_report(
    client: AgentClient, agent: RunningAgent
) -> None:
    """A simple string skips the shell, but a missing or non-executable program is reported as the shell does,
    in the background (a pid, then exit 127/126) as in the foreground, and a script without #! still runs."""
    (agent.workdir / "plain.txt").write_text("x")
    (agent.workdir / "noshebang").write_text("echo from-script\n")
    (agent.workdir / "noshebang").chmod(0o755)
    for cmd, code, says in [
        ("no-such-command-xyz a", 127, b"no-such-command-xyz: command not found"),
        ("./plain.txt", 126, b"Permission denied"),
        ("./noshebang", 0, b""),
    ]:
        handle = await client.spawn(cmd)
        items = [item async for item in handle]
        err = b"".join(i.data for i in items if isinstance(i, OutputChunk) and i.stream == "stderr")
        assert (items[-1], says in err) == (ProcessExit(code, None), True), (cmd, err)
        res = await client.exec(cmd)
        assert (res.exit_code, says in res.stderr) == (code, True), (cmd, res)
    assert (await client.exec("./noshebang")).stdout == b"from-script\n"
    listed = {tuple(p.cmd) for p in await client.list_processes()}
    assert ("/bin/bash", "-c", "no-such-command-xyz a") in listed  # the shell that reported it
    with pytest.raises(ProcessNotFoundError):
        await client.attach(999_999_999)
    with pytest.raises(ProcessNotFoundError):
        await client.kill(999_999_999)


async def test_reconnect_and_reattach(agent: RunningAgent) -> None:
    first = await agent.client()
    handle = await first.spawn(["sh", "-c", 'echo ready; read line; echo "got $line"; exit 4'], stdin=True)
    await read_until(handle, b"ready\n", bytearray())
    await first.aclose()
    assert first.closed
    with pytest.raises(AgentDisconnectedError):
        await first.ping()

    second = await agent.client()
    pids = [p.pid for p in await second.list_processes() if p.running]
    assert handle.pid in pids
    again = await second.attach(handle.pid)
    seen = bytearray()
    await read_until(again, b"ready\n", seen)  # from the tail buffer
    await again.send_stdin(b"hello\n")
    await read_until(again, b"got hello\n", seen)
    assert await again.wait() == ProcessExit(4, None)
    await second.aclose()


async def test_background_stdin_eof(client: AgentClient) -> None:
    handle = await client.spawn(["wc", "-c"], stdin=True)
    await handle.send_stdin(b"x" * 5_000_000)
    await handle.close_stdin()
    seen = bytearray()
    await read_until(handle, b"5000000", seen)
    assert await handle.wait() == ProcessExit(0, None)


async def test_pty_shell_and_resize(client: AgentClient) -> None:
    handle = await client.spawn(["bash", "--norc", "--noprofile", "-i"], pty=(80, 24), stdin=True)
    seen = bytearray()
    await handle.send_stdin(b"echo hi\n")
    await read_until(handle, b"\rhi\r\n", seen)  # the typed "echo hi" echoes too: not preceded by \r
    await handle.send_stdin(b"tty; stty size\n")
    await read_until(handle, b"24 80", seen)
    assert b"/dev/pts/" in seen
    await handle.resize(100, 40)
    await handle.send_stdin(b"stty size\n")
    await read_until(handle, b"40 100", seen)
    info = {p.pid: p for p in await client.list_processes()}[handle.pid]
    assert info.pty
    await handle.send_stdin(b"exit 5\n")
    assert await handle.wait() == ProcessExit(5, None)


async def test_pty_resize_needs_a_pty(client: AgentClient) -> None:
    handle = await client.spawn(["sleep", "1000"])
    with pytest.raises(BadRequestError):
        await handle.resize(10, 10)
    await handle.kill()
    assert (await handle.wait()).signal == 9


async def test_disconnect_fails_pending_calls(agent: RunningAgent) -> None:
    c = await agent.client()
    task = asyncio.create_task(c.exec(["sleep", "1000"]))
    await asyncio.sleep(0)  # let the task send its CALL first
    (sleeper,) = [p.pid for p in await c.list_processes()]  # foreground execs are listed while they run
    try:
        agent.proc.kill()
        with pytest.raises(AgentDisconnectedError):
            await task
        await c.wait_closed()
        assert c.closed
        agent.proc.wait()
    finally:
        os.killpg(sleeper, signal.SIGKILL)  # a SIGKILLed agent cannot clean up (a sandbox's pid ns would)


async def test_connect_timeout_without_agent(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp_path / "s"))
        sock.listen(1)
        with pytest.raises(TimeoutError_):
            await AgentClient.connect(tmp_path / "s", timeout=0.2)
    finally:
        sock.close()
    with pytest.raises(AgentDisconnectedError):
        await AgentClient.connect(tmp_path / "missing.sock", timeout=1)


# -- files --------------------------------------------------------------------------------------------


async def test_write_read_stat_atomic(client: AgentClient, agent: RunningAgent) -> None:
    entry = await client.write_file("deep/er/f.txt", b"one", mode=0o600)
    target = agent.workdir / "deep/er/f.txt"
    assert (entry.path, entry.name, entry.type, entry.size, entry.mode) == (
        str(target),
        "f.txt",
        "file",
        3,
        0o600,
    )
    assert target.read_bytes() == b"one"
    assert await client.read_file(str(target)) == b"one"
    inode = target.stat().st_ino
    entry = await client.write_file("deep/er/f.txt", b"two!")  # keeps the mode, replaces the inode (rename)
    assert (entry.size, entry.mode) == (4, 0o600)
    assert target.stat().st_ino != inode
    assert sorted(os.listdir(target.parent)) == ["f.txt"]  # no temp file left behind
    assert (await client.write_file("new.txt", b"")).mode == 0o644
    assert await client.read_file("new.txt") == b""
    st = await client.stat("deep")
    assert (st.type, st.name) == ("dir", "deep")
    os.symlink("deep/er/f.txt", agent.workdir / "link")
    st = await client.stat("link")
    assert (st.type, st.symlink_target) == ("symlink", "deep/er/f.txt")
    big = os.urandom(3 * 1024 * 1024 + 17)
    await client.write_file("big.bin", big)
    assert await client.read_file("big.bin") == big


async def test_list_dir_depth(client: AgentClient, agent: RunningAgent) -> None:
    await client.mkdir("t/a/b/c")
    await client.write_file("t/a/f1", b"12")
    await client.write_file("t/a/b/f2", b"x")
    top = await client.list_dir("t")
    assert [(e.name, e.type) for e in top] == [("a", "dir")]
    two = await client.list_dir("t", depth=2)
    assert [e.path.removeprefix(str(agent.workdir)) for e in two] == ["/t/a", "/t/a/b", "/t/a/f1"]
    assert {e.name: e.size for e in two}["f1"] == 2
    everything = await client.list_dir(str(agent.workdir / "t"), depth=10)
    assert len(everything) == 5
    with pytest.raises(NotADirectoryInSandboxError):
        await client.list_dir("t/a/f1")
    with pytest.raises(FileNotFoundInSandboxError):
        await client.list_dir("nope")


async def test_list_dir_many_entries(client: AgentClient, agent: RunningAgent) -> None:
    d = agent.workdir / "many"
    d.mkdir()
    names = [f"{i:05d}-" + "n" * 150 for i in range(6000)]  # > 1 MiB of JSON: sent in several frames
    for name in names:
        (d / name).touch()
    entries = await client.list_dir("many")
    assert [e.name for e in entries] == names


async def test_mkdir_remove_rename(client: AgentClient, agent: RunningAgent) -> None:
    entry = await client.mkdir("x/y/z")
    assert entry.type == "dir"
    assert (await client.mkdir("x/y/z")).type == "dir"  # exists: fine
    await client.write_file("x/y/z/f", b"data")
    with pytest.raises(FileExistsInSandboxError):
        await client.mkdir("x/y/z/f")
    with pytest.raises(ConflictError):
        await client.remove("x")  # not empty
    moved = await client.rename("x/y/z/f", "x/g")
    assert (moved.name, moved.size) == ("g", 4)
    assert (agent.workdir / "x/g").read_bytes() == b"data"
    await client.remove("x/g")
    assert not (agent.workdir / "x/g").exists()
    await client.remove("x", recursive=True)
    assert not (agent.workdir / "x").exists()
    with pytest.raises(FileNotFoundInSandboxError):
        await client.remove("x")
    with pytest.raises(FileNotFoundInSandboxError):
        await client.rename("nope", "other")


async def test_file_errors_and_invalid_paths(client: AgentClient, agent: RunningAgent) -> None:
    with pytest.raises(FileNotFoundInSandboxError):
        await client.read_file("missing")
    with pytest.raises(FileNotFoundInSandboxError):
        await client.stat("/no/such/file")
    await client.mkdir("adir")
    with pytest.raises(IsADirectoryInSandboxError):
        await client.read_file("adir")
    with pytest.raises(IsADirectoryInSandboxError):
        await client.write_file("adir", b"x")
    await client.write_file("afile", b"x")
    with pytest.raises(NotADirectoryInSandboxError):
        await client.write_file("afile/child", b"x")
    for bad in ["", "a\x00b", "/..", "/a/../../b", "../" * 50]:
        with pytest.raises(InvalidPathError):
            await client.stat(bad)
    with pytest.raises(InvalidPathError):
        await client.remove("/")
    assert (await client.stat("/tmp/../")).path == "/"
    assert (await client.stat("a/../afile")).path == str(agent.workdir / "afile")


async def test_download_closed_early(client: AgentClient) -> None:
    await client.write_file("big", os.urandom(8 * 1024 * 1024))
    gen = client.download("big")
    first = await gen.__anext__()
    assert len(first) == 256 * 1024
    await gen.aclose()
    assert await client.ping() > 0
    assert len(await client.read_file("big")) == 8 * 1024 * 1024


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_one_gib_upload_and_download_bounded_memory(client: AgentClient, agent: RunningAgent) -> None:
    total = 1 << 30
    block = os.urandom(1 << 20)
    sent = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(total // len(block)):
            chunk = i.to_bytes(8, "big") + block[8:]
            sent.update(chunk)
            yield chunk

    try:
        own_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        entry = await client.upload("huge.bin", chunks(), mode=0o640)
        assert (entry.size, entry.mode) == (total, 0o640)
        got = hashlib.sha256()
        size = 0
        async for chunk in client.download("huge.bin"):
            got.update(chunk)
            size += len(chunk)
        assert size == total
        assert got.hexdigest() == sent.hexdigest()
        assert _rss_peak_kib(agent.agent_pid()) < 100 * 1024
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - own_before < 100 * 1024
    finally:
        (agent.workdir / "huge.bin").unlink(missing_ok=True)  # 1 GiB: do not wait for tmp_path rotation


async def test_upload_failure_is_reported(client: AgentClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    with pytest.raises(InvalidPathError):
        await client.upload("a\x00", chunks())
    assert await client.ping() > 0


# -- PID 1 ----------------------------------------------------------------------------------------------


@pytest.mark.root
async def test_reaps_orphans_as_pid1(agent_factory: Callable[..., RunningAgent]) -> None:
    agent = agent_factory(prefix=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"))
    c = await agent.client()
    assert c.hello["pid"] == 1
    # a double fork: the subshell exits at once, its sleep is re-parented to PID 1 (the agent)
    res = await c.exec(["sh", "-c", "(sleep 1000 >/dev/null 2>&1 & echo $!)"])
    orphan = int(res.stdout)
    stat = Path(f"/proc/{agent.agent_pid()}").exists()
    assert stat
    ppid = await c.exec(["sh", "-c", f"awk '{{print $4}}' /proc/{orphan}/stat"])
    assert ppid.stdout == b"1\n"
    await c.exec(["kill", "-9", str(orphan)])
    await wait_gone(c, orphan)  # a zombie keeps /proc/PID: this only returns once PID 1 reaped it
    zombies = await c.exec(["sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"])
    assert zombies.stdout == b""
    await c.aclose()


async def _chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _gnu_tar(*args: str) -> bytes:
    return subprocess.run(["tar", *args], check=True, capture_output=True).stdout


async def test_archive_round_trip_with_gnu_tar(client: AgentClient, agent: RunningAgent, tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = src / ("d" * 120) / "sub"  # names past ustar's 100 bytes: GNU long names on the way in, pax out
    deep.mkdir(parents=True)
    (deep / "big.bin").write_bytes(big := os.urandom(1024 * 1024 + 3))
    (src / "empty").write_bytes(b"")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "ünïcode.txt").write_text("u")
    os.symlink("run.sh", src / "link")
    os.link(src / "run.sh", src / "hard")
    os.utime(src / "empty", (1_600_000_000, 1_600_000_000))
    made = await client.upload_archive("dest/here", _chunks(_gnu_tar("-C", str(src), "-c", ".")))
    dest = agent.workdir / "dest/here"
    assert (made.path, made.files, made.links, made.bytes) == (str(dest), 4, 2, len(big) + 18 + 1)
    assert made.dirs == 2
    assert (dest / ("d" * 120) / "sub/big.bin").read_bytes() == big
    assert (dest / "run.sh").stat().st_mode & 0o7777 == 0o750
    assert os.readlink(dest / "link") == "run.sh"
    assert (dest / "hard").stat().st_ino == (dest / "run.sh").stat().st_ino
    assert (dest / "empty").stat().st_mtime == 1_600_000_000
    assert (dest / "ünïcode.txt").read_text() == "u"

    # Out again: GNU tar reads it back to the same tree (pax long names, the symlink as a link).
    tar = b"".join([c async for c in client.download_archive("dest/here")])
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(["tar", "-x", "-C", str(back)], input=tar, check=True)
    assert (back / ("d" * 120) / "sub/big.bin").read_bytes() == big
    assert os.readlink(back / "link") == "run.sh"
    assert (back / "run.sh").stat().st_mode & 0o7777 == 0o750
    listing = subprocess.run(["tar", "-t"], input=tar, check=True, capture_output=True).stdout.decode().split("\n")
    assert "run.sh" in listing and "./run.sh" not in listing  # names relative to the directory, no ./
    # One file: a one-member archive under its own name.
    one = b"".join([c async for c in client.download_archive("dest/here/run.sh")])
    listing = subprocess.run(["tar", "-t"], input=one, check=True, capture_output=True).stdout.decode().split()
    assert listing == ["run.sh"]
    # Merging into an existing tree replaces files, keeps the others.
    (src / "run.sh").unlink()
    (src / "run.sh").write_text("new")
    again = await client.upload_archive("dest/here", _chunks(_gnu_tar("-C", str(src), "-c", "run.sh")))
    assert (again.files, (dest / "run.sh").read_text(), (dest / "hard").read_text()) == (
        1,
        "new",
        "#!/bin/sh\necho hi\n",
    )


async def test_archive_bad_input_is_refused(client: AgentClient, agent: RunningAgent, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    good = _gnu_tar("-C", str(tmp_path), "-c", "f")
    with pytest.raises(BadRequestError, match="empty"):
        await client.upload_archive("t1", _chunks(b""))
    with pytest.raises(BadRequestError, match="gzip-compressed: send an uncompressed tar"):
        await client.upload_archive("t2", _chunks(_gnu_tar("-C", str(tmp_path), "-cz", "f")))
    with pytest.raises(BadRequestError, match="truncated"):
        await client.upload_archive("t3", _chunks(good[:700]))
    escape = _gnu_tar("-C", str(tmp_path), "-c", "--transform=s,^f,../../f,", "f")
    with pytest.raises(BadRequestError, match="climbs out"):
        await client.upload_archive("t4", _chunks(escape))
    assert not (agent.workdir.parent / "f").exists()
    await client.write_file("plain", b"x")
    with pytest.raises(NotADirectoryInSandboxError):
        await client.upload_archive("plain", _chunks(good))
    with pytest.raises(FileNotFoundInSandboxError):
        _ = [c async for c in client.download_archive("missing")]
    # Absolute member names land inside the target, as GNU tar does without -P.
    absolute = _gnu_tar("-C", str(tmp_path), "-cP", str(tmp_path / "f"))
    made = await client.upload_archive("t5", _chunks(absolute))
    assert (agent.workdir / "t5" / str(tmp_path / "f").lstrip("/")).read_text() == "x"
    assert made.files == 1
    assert await client.ping() > 0


async def test_archive_download_closed_early(client: AgentClient, agent: RunningAgent) -> None:
    for i in range(4):
        await client.write_file(f"tree/f{i}", os.urandom(3 * 1024 * 1024))
    gen = client.download_archive("tree")
    assert len(await gen.__anext__()) == 256 * 1024
    await gen.aclose()
    assert await client.ping() > 0
    assert len(b"".join([c async for c in client.download_archive("tree")])) > 12 * 1024 * 1024
