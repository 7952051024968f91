"""The SDK: pure request building, config precedence and error mapping; then Sandbox and AsyncSandbox against a
real ``branchbox serve`` subprocess on loopback (including 50 parallel creates + execs)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import branchbox.sdk as sdk
from branchbox.api.auth import generate_api_key, hash_api_key
from branchbox.errors import ERROR_CLASSES
from branchbox.sdk import (
    AsyncSandbox,
    AuthenticationError,
    BadRequestError,
    CommandResult,
    ConnectionError_,
    FileNotFoundError_,
    NotFoundError,
    Sandbox,
    SandboxNotFoundError,
    TimeoutException,
    _awire,
)
from branchbox.sdk import _requests as rq
from branchbox.sdk import _tar as _tar_mod
from branchbox.sdk._config import ConnectionConfig
from branchbox.sdk._http1 import InvalidRequest, Parser
from branchbox.sdk._wire import Wire, shared_wire
from tests.conftest import DaemonProc, cli_env

# ------------------------------------------------------------------ pure


def test_all_is_exported() -> None:
    for name in sdk.__all__:
        assert hasattr(sdk, name), name
    assert len(set(sdk.__all__)) == len(sdk.__all__)


def test_sdk_imports_nothing_of_the_daemon() -> None:
    """Nor httpx (one client stack, its own), nor websockets until a WebSocket is opened."""
    code = (
        "import sys, branchbox.sdk\n"
        "bad = [m for m in sys.modules\n"
        "       if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'structlog', 'httpx', 'httpcore',\n"
        "                              'websockets')\n"
        "       or m.startswith(('branchbox.core', 'branchbox.api', 'branchbox.daemon', 'branchbox.agent'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    sdk_dir = Path(sdk.__file__).parent
    assert (sdk_dir / "py.typed").is_file()
    for f in sdk_dir.glob("*.py"):  # the only branchbox imports are of branchbox.sdk itself
        for line in f.read_text().splitlines():
            if line.startswith(("import branchbox", "from branchbox")):
                assert line.startswith(("from branchbox.sdk", "import branchbox.sdk")), (f.name, line)


def test_error_table_covers_every_core_code() -> None:
    for code, core_cls in ERROR_CLASSES.items():
        assert code in sdk.ERROR_TABLE, f"{code} is missing from the SDK's ERROR_TABLE"
        exc = sdk.error_for(code, "m", status=core_cls.http_status)
        assert exc.code == code
        assert exc.status == core_cls.http_status
        family = sdk._errors._BY_STATUS.get(core_cls.http_status)  # e.g. every 403 is a PermissionDeniedError
        assert family is None or isinstance(exc, family), code
        # the builtin families match: LookupError, ValueError, TimeoutError
        for builtin in (LookupError, ValueError, TimeoutError):
            assert isinstance(exc, builtin) == issubclass(core_cls, builtin), code
    assert isinstance(sdk.error_for("brand_new_code", "m", status=404), NotFoundError)
    assert type(sdk.error_for("brand_new_code", "m", status=500)) is sdk.ServerError


def test_raise_for_status_maps_codes_and_non_json_bodies() -> None:
    body = json.dumps({"error": {"code": "sandbox_not_found", "message": "no sandbox x: list them"}}).encode()
    with pytest.raises(SandboxNotFoundError, match="list them") as info:
        rq.raise_for_status(404, body)
    assert info.value.code == "sandbox_not_found"
    with pytest.raises(sdk.ServerError, match="non-JSON"):
        rq.raise_for_status(502, b"<html>bad gateway</html>")
    rq.raise_for_status(204, b"")


def test_config_precedence_call_over_client_over_env_over_default() -> None:
    env = {"BRANCHBOX_URL": "http://env:1", "BRANCHBOX_API_KEY": "envkey", "BRANCHBOX_REQUEST_TIMEOUT": "5"}
    assert ConnectionConfig.resolve(env={}) == ConnectionConfig("http://127.0.0.1:7077", None, 60.0)
    from_env = ConnectionConfig.resolve(env=env)
    assert from_env == ConnectionConfig("http://env:1", "envkey", 5.0)
    client = ConnectionConfig.resolve(base_url="http://client:2/", api_key="ck", request_timeout=None, env=env)
    assert client == ConnectionConfig("http://client:2", "ck", None)
    assert client.with_timeout(3.0).request_timeout == 3.0  # per call
    assert client.with_timeout(sdk._config.UNSET) is client
    assert client.headers()["authorization"] == "Bearer ck"
    assert ConnectionConfig.resolve(base_url="https://h:3/x", env={}).ws_url("/p", a="b") == "wss://h:3/x/p?a=b"
    with pytest.raises(ValueError, match="BRANCHBOX_URL"):
        ConnectionConfig.resolve(base_url="localhost:7077", env={})


def test_request_building() -> None:
    r = rq.list_sandboxes(metadata={"a": "1", "b": "x=y"}, state=["running", "paused"])
    assert r.params == [("metadata", "a=1"), ("metadata", "b=x=y"), ("state", "running"), ("state", "paused")]
    assert rq.get_sandbox("a/b").path == "/v1/sandboxes/a%2Fb"
    run = rq.run_command(
        "s", ["ls", "-l"], background=False, envs=None, cwd=None, user=None, stdin=None, timeout=30.0,
        tag=None, request_timeout=60.0,
    )  # fmt: skip
    assert run.json == {"cmd": ["ls", "-l"], "timeout": 30.0}
    assert run.use_default_timeout is False
    assert run.timeout is not None
    assert run.timeout > 30.0
    unlimited = rq.run_command(
        "s", "x", background=False, envs=None, cwd=None, user=None, stdin=None, timeout=None, tag=None,
        request_timeout=60.0,
    )  # fmt: skip
    assert unlimited.timeout is None
    bg = rq.run_command(
        "s", "x", background=True, envs={"A": "1"}, cwd="/w", user=None, stdin=None, timeout=None, tag="t",
        request_timeout=None,
    )  # fmt: skip
    assert bg.json == {"cmd": "x", "envs": {"A": "1"}, "cwd": "/w", "tag": "t", "background": True}
    assert bg.use_default_timeout
    assert rq.remove("s", "/a", True).params == [("path", "/a"), ("recursive", "true")]
    with pytest.raises(ValueError, match="sandbox_id"):
        rq.get_sandbox("")


def test_stream_frames_roundtrip() -> None:
    assert json.loads(rq.stdin_frame(b"\xff\x00", binary=True)) == {"type": "stdin", "data": "/wA="}
    ev = rq.parse_event(json.dumps({"type": "stdout", "data": "/wA="}), binary=True)
    assert ev.data == b"\xff\x00"
    ev = rq.parse_event(json.dumps({"type": "exit", "exit_code": 3, "signal": None}), binary=False)
    assert (ev.kind, ev.exit_code) == ("exit", 3)
    ev = rq.parse_event(json.dumps({"type": "error", "error": {"code": "invalid_state", "message": "m"}}), binary=False)
    assert isinstance(ev.error, sdk.InvalidStateError)
    assert isinstance(rq.ws_close_error(4404, "sandbox_not_found"), SandboxNotFoundError)


def test_unreachable_daemon_is_a_connection_error() -> None:
    with pytest.raises(ConnectionError_, match="branchbox serve"):
        Sandbox.list(base_url="http://127.0.0.1:9")


def test_unreachable_daemon_on_the_keep_alive_path_is_a_connection_error() -> None:
    with pytest.raises(ConnectionError_, match="branchbox serve"):
        Sandbox.create(base_url="http://127.0.0.1:9")
    with pytest.raises(ConnectionError_, match="branchbox serve"):
        asyncio.run(AsyncSandbox.create(base_url="http://127.0.0.1:9"))


# ------------------------------------------------------------------ keep-alive connections (a real local server)


class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive JSON server: ``/close`` answers with Connection: close, ``/drop`` closes the
    connection after answering without saying so (like an idle timeout), ``/chunked`` uses chunked encoding."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[set[tuple[str, int]]] = set()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        type(self).connections.add(self.client_address)
        length = int(self.headers.get("content-length") or 0)
        got = json.loads(self.rfile.read(length)) if length else None
        body = json.dumps({"path": self.path, "method": self.command, "got": got}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if self.path == "/chunked":
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in (body[:5], body[5:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/close":
            self.send_header("connection", "close")
            self.close_connection = True
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/drop":
            self.close_connection = True

    do_GET = do_POST = do_DELETE = _answer


@pytest.fixture
def local_server() -> Iterator[str]:
    _Handler.connections = set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_sync_wire_keeps_connections_alive_and_replaces_closed_ones(local_server: str) -> None:
    wire = Wire(ConnectionConfig.resolve(base_url=local_server, env={}))
    try:
        for _ in range(3):
            assert wire.request("POST", "/a", b'{"x":1}', 10).json() == {
                "path": "/a",
                "method": "POST",
                "got": {"x": 1},
            }
        assert len(_Handler.connections) == 1  # one connection, kept alive
        assert wire.request("GET", "/close", None, 10).status_code == 200  # Connection: close is honoured
        assert wire.request("GET", "/drop", None, 10).status_code == 200  # closed silently after the answer
        assert wire.request("DELETE", "/b", None, 10).json()["method"] == "DELETE"  # a new connection, no error
        assert len(_Handler.connections) == 3
        assert wire.request("GET", "/chunked", None, 10).json()["path"] == "/chunked"
        assert wire.request("GET", "/after-chunked", None, 10).json()["path"] == "/after-chunked"  # still in sync
        assert len(_Handler.connections) == 3
        with pytest.raises(InvalidRequest):
            wire.request("GET", "/x\r\nInjected: 1", None, 10)
    finally:
        wire.close()
    assert shared_wire(ConnectionConfig.resolve(base_url=local_server, env={})) is shared_wire(
        ConnectionConfig.resolve(base_url=local_server + "/", env={})
    )


async def test_async_wire_pools_per_loop_and_closes_with_the_last_user(local_server: str) -> None:
    config = ConnectionConfig.resolve(base_url=local_server, env={})
    first, second = _awire.acquire(config), _awire.acquire(config)
    assert first is second
    replies = await asyncio.gather(*(first.request("POST", f"/{i}", b"{}", 10) for i in range(8)))
    assert [r.json()["path"] for r in replies] == [f"/{i}" for i in range(8)]
    assert (await first.request("GET", "/chunked", None, 10)).json()["path"] == "/chunked"
    assert (await first.request("GET", "/drop", None, 10)).status_code == 200
    assert (await first.request("GET", "/after-drop", None, 10)).json()["path"] == "/after-drop"
    assert len(_Handler.connections) <= 9  # concurrent requests open connections; later ones reuse them
    _awire.release(config, first)
    assert first._idle  # another user still holds the pool
    _awire.release(config, second)
    assert first._idle == []
    assert _awire.acquire(config) is not first  # a fresh pool after the last user left
    _awire.release(config, _awire.acquire(config))


# ------------------------------------------------------------------ against a real daemon


@pytest.mark.root
def test_user_flow_sync(daemon: DaemonProc) -> None:
    url = daemon.url
    with Sandbox.create(template="default", timeout=300, metadata={"task": "t1"}, envs={"A": "1"}, base_url=url) as sbx:
        assert sbx.info.timings["total"] > 0
        assert sbx.info.state == "running"
        chunks: list[str] = []
        r = sbx.commands.run("echo $A; ls /", on_stdout=chunks.append, timeout=60)
        assert r.exit_code == 0
        assert r.stdout.startswith("1\n")
        assert "etc" in r.stdout.split()
        assert "".join(chunks) == r.stdout
        r2 = sbx.commands.run("echo out; echo err >&2; exit 3")
        assert (r2.exit_code, r2.stdout, r2.stderr) == (3, "out\n", "err\n")
        assert sbx.commands.run("cat", stdin="piped").stdout == "piped"
        assert sbx.commands.run("cat", stdin="streamed", on_stderr=print).stdout == "streamed"
        h = sbx.commands.run("sleep 100", background=True)
        assert any(p.pid == h.pid and p.running for p in sbx.commands.list())
        assert sbx.commands.kill(h.pid) is True
        assert sbx.commands.kill(999_999) is False
        sbx.files.write("/work/x.py", "print(1)")
        assert sbx.files.read("/work/x.py") == "print(1)"
        assert [e.name for e in sbx.files.list("/work")] == ["x.py"]
        assert sbx.commands.run(["python3", "/work/x.py"]).stdout == "1\n"
        # a program that cannot run is a result like a shell's, plain or streamed, argv or string; in the
        # background a string still gets its shell's process, an argv (no process to show) an error
        for cmd in (["no-such-program", "a"], "no-such-program a"):
            for streamed in (None, chunks.append):
                miss = sbx.commands.run(cmd, on_stderr=streamed)
                assert (miss.exit_code, "no-such-program: command not found" in miss.stderr) == (127, True), miss
        assert sbx.commands.run(["/work/x.py"], on_stdout=print).exit_code == 126  # not executable
        assert sbx.commands.run("no-such-program", background=True).wait().exit_code == 127
        with pytest.raises(FileNotFoundError_):
            sbx.commands.run(["no-such-program"], background=True)
        assert sbx.files.make_dir("/work/d/e").type == "dir"
        assert sbx.files.rename("/work/x.py", "/work/d/y.py").path == "/work/d/y.py"
        assert sbx.files.exists("/work/d/y.py")
        assert not sbx.files.exists("/work/x.py")
        sbx.files.remove("/work/d", recursive=True)
        with pytest.raises(FileNotFoundError_):
            sbx.files.read("/work/d/y.py")
        assert [i.sandbox_id for i in Sandbox.list(metadata={"task": "t1"}, base_url=url)] == [sbx.sandbox_id]
        assert Sandbox.list(metadata={"task": "other"}, base_url=url) == []
        again = Sandbox.connect(sbx.sandbox_id, base_url=url)
        before = again.info.end_at
        assert before is not None
        after = again.set_timeout(600).end_at
        assert after is not None
        assert after > before
        again.close()
        sid = sbx.sandbox_id
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(sid, base_url=url)


@pytest.mark.root
def test_background_wait_and_pty(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        h = sbx.commands.run("sleep 0.2; echo done; exit 4", background=True)
        res = h.wait()
        assert res.exit_code == 4
        out: list[bytes] = []
        term = sbx.pty.create(cols=80, rows=24, on_data=out.append)
        assert term.pid > 0
        term.resize(120, 40)
        term.send_input("stty size; echo hi-$((40+2))\n")
        term.send_input(b"exit 5\n")
        result = term.wait(timeout=60)
        assert result.exit_code == 5
        text = b"".join(out).decode()
        assert "40 120" in text
        assert "hi-42" in text
        collected = sbx.pty.create(cmd=["/bin/sh"])
        collected.send_input("echo via-sh\nexit\n")
        assert "via-sh" in collected.wait(timeout=60).stdout
        killed = sbx.pty.create()
        killed.kill()
        assert killed.wait(timeout=60).signal == 9


@pytest.mark.root
def test_large_file_streams_both_ways(daemon: DaemonProc, tmp_path: Path) -> None:
    blob = (bytes(range(256)) * 4096) * 24  # 24 MiB, not a multiple of any chunk size after the tail below
    blob += b"tail"
    src = tmp_path / "big.bin"
    src.write_bytes(blob)
    with Sandbox.create(base_url=daemon.url) as sbx:
        entry = sbx.files.upload("/work/big.bin", src)
        assert entry.size == len(blob)
        r = sbx.commands.run("sha256sum /work/big.bin")
        assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        sink = io.BytesIO()
        assert sbx.files.download("/work/big.bin", sink) == len(blob)
        assert sink.getvalue() == blob
        assert sbx.files.read("/work/big.bin", format="bytes") == blob


def _tree(root: Path) -> dict[str, Any]:
    """A directory as {relative name: bytes, link target or "dir"}."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        name = str(p.relative_to(root))
        out[name] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def _make_tree(root: Path) -> None:
    (root / "src/pkg").mkdir(parents=True)
    (root / "src/pkg/mod.py").write_text("print('hi')\n")
    (root / "src/pkg/data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (root / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("src/pkg/mod.py", root / "link")
    for i in range(200):
        (root / "src" / f"f{i:03d}.txt").write_text(str(i))


@pytest.mark.root
def test_directories_copy_both_ways_as_one_tar(daemon: DaemonProc, tmp_path: Path) -> None:
    local = tmp_path / "proj"
    _make_tree(local)
    with Sandbox.create(base_url=daemon.url) as sbx:
        made = sbx.files.upload_dir(local, "/work/proj")
        assert (made.path, made.files, made.dirs, made.links) == ("/work/proj", 203, 3, 1)
        r = sbx.commands.run("cd /work/proj && ./run.sh && readlink link && find . | wc -l && cat src/f007.txt")
        assert r.stdout.split() == ["src/pkg/mod.py", "208", "7"]  # find counts "." too
        back = tmp_path / "back"
        assert sbx.files.download_dir("/work/proj", back) == 207
        assert _tree(back) == _tree(local)
        assert (back / "run.sh").stat().st_mode & 0o777 == 0o755
        tar = io.BytesIO()
        assert sbx.files.download_archive("/work/proj/run.sh", tar) > 0
        with tarfile.open(fileobj=io.BytesIO(tar.getvalue())) as one:
            assert one.getnames() == ["run.sh"]
        # A bad tar: the stable code, and nothing of it written.
        with pytest.raises(BadRequestError, match="climbs out"):
            sbx.files.write_archive("/work/x", _tar_of(("../../etc/evil", b"x")))
        assert not sbx.files.exists("/etc/evil")
        with pytest.raises(BadRequestError, match="gzip"):
            sbx.files.write_archive("/work/x", gzip.compress(_tar_of(("a", b"x"))))
        with pytest.raises(BadRequestError) as info:
            sbx.files.write_archive("/work/proj/run.sh", _tar_of(("a", b"x")))
        assert info.value.code == "not_a_directory"
        with pytest.raises(FileNotFoundError_):
            sbx.files.download_dir("/work/none", tmp_path / "none")


@pytest.mark.root
def test_the_default_template_installs_python_packages(daemon: DaemonProc, tmp_path: Path) -> None:
    """pip and venv are there, and pip installs into the system Python (no PEP 668 refusal, no root warning).
    The project is local: these machines' sandboxes have no PyPI."""
    project = tmp_path / "hello"
    (project / "hello_bb").mkdir(parents=True)
    (project / "hello_bb/__init__.py").write_text("def hi():\n    return 'hi from a package'\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "hello-bb"\nversion = "1.0"\n'
    )
    with Sandbox.create(base_url=daemon.url) as sbx:
        sbx.files.upload_dir(project, "/work/hello")
        r = sbx.commands.run("pip install --no-index --no-build-isolation /work/hello", timeout=300)
        assert r.exit_code == 0, r.stderr
        assert "WARNING" not in r.stderr and "externally-managed" not in r.stderr
        assert sbx.commands.run("cd / && python3 -c 'import hello_bb; print(hello_bb.hi())'").stdout == (
            "hi from a package\n"
        )
        venv = sbx.commands.run("python3 -m venv /work/v && /work/v/bin/python -m pip --version", timeout=300)
        assert venv.exit_code == 0 and "/work/v/lib/python3" in venv.stdout, venv.stderr


def _tar_of(*members: tuple[str, bytes], links: tuple[tuple[str, str], ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def test_a_sandboxs_tar_cannot_write_outside_the_local_directory(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in ("../outside/x", "/tmp/x", "a/../../outside/x"):
        with pytest.raises(ValueError, match="outside the target"):
            _tar_mod.unpack(io.BytesIO(_tar_of((bad, b"x"))), dest)
    # A link in the local directory that leads out of it is never written through.
    assert list(dest.iterdir()) == []  # refused before anything was written
    os.symlink(outside, dest / "esc")
    with pytest.raises(ValueError, match="symlink in its path"):
        _tar_mod.unpack(io.BytesIO(_tar_of(("esc/x", b"x"))), dest)
    assert list(outside.iterdir()) == []
    kept = _tar_of(("a/f", b"1"), links=(("in", "a/f"), ("abs", "/etc/passwd"), ("up", "../outside")))
    skipped: list[tuple[str, str]] = []
    assert _tar_mod.unpack(io.BytesIO(kept), tmp_path / "ok", lambda *s: skipped.append(s)) == 2
    why = "a symlink to {} (outside the directory)"
    assert skipped == [("abs", why.format("/etc/passwd")), ("up", why.format("../outside"))]
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["a", "in"]


@pytest.mark.root
def test_errors_are_typed(daemon: DaemonProc) -> None:
    url = daemon.url
    with pytest.raises(SandboxNotFoundError, match="no-such"):
        Sandbox.connect("no-such", base_url=url)
    with pytest.raises(sdk.TemplateNotFoundError):
        Sandbox.create(template="no-such-template", base_url=url)
    with pytest.raises(BadRequestError):
        Sandbox.create(timeout=-1, base_url=url)
    with Sandbox.create(base_url=url) as sbx:
        with pytest.raises(FileNotFoundError_):
            sbx.files.read("/nope")
        with pytest.raises(TimeoutException):
            sbx.commands.run("sleep 5", request_timeout=0.2, timeout=None)


@pytest.mark.root
def test_api_key_daemon(daemon_factory: Any) -> None:
    key = generate_api_key()
    d: DaemonProc = daemon_factory(
        env={"BRANCHBOX_REQUIRE_AUTH": "true", "BRANCHBOX_API_KEY_HASHES": hash_api_key(key)}
    )
    with pytest.raises(AuthenticationError, match="API key is required"):
        Sandbox.list(base_url=d.url, api_key="")
    with pytest.raises(AuthenticationError, match="invalid API key"):
        Sandbox.list(base_url=d.url, api_key="wrong")
    with Sandbox.create(base_url=d.url, api_key=key) as sbx:
        assert sbx.commands.run("echo ok", on_stdout=lambda _: None).stdout == "ok\n"  # the WebSocket too
        assert Sandbox.list(base_url=d.url, api_key=key)[0].sandbox_id == sbx.sandbox_id


@pytest.mark.root
def test_env_settings_are_used(daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHBOX_URL", daemon.url)
    assert Sandbox.list() == []
    monkeypatch.setenv("BRANCHBOX_URL", "http://127.0.0.1:9")
    assert Sandbox.list(base_url=daemon.url) == []  # client beats env


@pytest.mark.root
async def test_user_flow_async(daemon: DaemonProc, tmp_path: Path) -> None:
    url = daemon.url
    async with await AsyncSandbox.create(metadata={"task": "a"}, envs={"A": "2"}, base_url=url) as sbx:
        seen: list[str] = []

        async def on_out(text: str) -> None:
            seen.append(text)

        r = await sbx.commands.run("echo $A", on_stdout=on_out)
        assert r == CommandResult(0, "2\n", "", None, r.duration_ms)
        assert seen == ["2\n"]
        assert (await sbx.commands.run("exit 7")).exit_code == 7
        h = await sbx.commands.run("sleep 100", background=True)
        assert h.pid in [p.pid for p in await sbx.commands.list()]
        assert await h.kill()
        await sbx.files.write("/work/a.txt", b"bytes\x00here")
        assert await sbx.files.read("/work/a.txt", format="bytes") == b"bytes\x00here"
        assert (await sbx.files.get_info("/work/a.txt")).size == 10
        assert [i.sandbox_id for i in await AsyncSandbox.list(metadata={"task": "a"}, base_url=url)] == [sbx.sandbox_id]
        data: list[bytes] = []
        term = await sbx.pty.create(on_data=data.append)
        await term.send_input("echo pty-$((2*3))\n")
        await term.send_input("exit 0\n")
        assert (await term.wait()).exit_code == 0
        assert b"pty-6" in b"".join(data)
        templates = await AsyncSandbox.templates(base_url=url)
        assert "default" in [t.name for t in templates]
        _make_tree(tmp_path / "proj")
        made = await sbx.files.upload_dir(tmp_path / "proj", "/work/p")
        assert (made.files, made.links) == (203, 1)
        assert await sbx.files.download_dir("/work/p", tmp_path / "back") == 207
        assert _tree(tmp_path / "back") == _tree(tmp_path / "proj")
        tar = io.BytesIO()
        assert await sbx.files.download_archive("/work/p", tar) > 3 * 1024 * 1024
        assert (await sbx.files.write_archive("/work/q", tar.getvalue())).files == 203


@pytest.mark.root
@pytest.mark.timeout(600)
async def test_50_parallel_creates_and_execs(daemon: DaemonProc) -> None:
    url = daemon.url

    async def one(i: int) -> tuple[str, str]:
        sbx = await AsyncSandbox.create(metadata={"batch": "p50", "i": str(i)}, base_url=url, request_timeout=300)
        try:
            r = await sbx.commands.run(f"echo {i}; hostname", request_timeout=300)
            assert r.exit_code == 0
            return sbx.sandbox_id, r.stdout
        finally:
            await sbx.close()

    results = await asyncio.gather(*(one(i) for i in range(50)))
    ids = [sid for sid, _ in results]
    assert len(set(ids)) == 50
    for i, (_, stdout) in enumerate(results):
        assert stdout.split("\n")[0] == str(i)
    assert len({stdout.split("\n")[1] for _, stdout in results}) == 50  # every hostname differs
    listed = await AsyncSandbox.list(metadata={"batch": "p50"}, base_url=url, request_timeout=120)
    assert sorted(i.sandbox_id for i in listed) == sorted(ids)

    async def kill(sid: str) -> bool:
        sbx = await AsyncSandbox.connect(sid, base_url=url, request_timeout=300)
        try:
            return await sbx.kill()
        finally:
            await sbx.close()

    assert all(await asyncio.gather(*(kill(s) for s in ids)))
    assert await AsyncSandbox.list(base_url=url) == []


def test_wire_parses_a_chunked_answer_fed_in_pieces_once() -> None:
    """The clients' parser takes each byte once as bytes arrive (the async client once re-parsed the whole body on
    every read, quadratic for a foreground run's JSON, which comes in parts), whatever the split points; the async
    connection hands the whole answer over once, and the next answer's bytes stay."""
    body = [os.urandom(n) for n in (1, 70_000, 3, 65_536, 12)]
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    wire += b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in body) + b"0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    for step in (1, 7, 4096, len(wire)):
        parser, got = Parser(bytearray()), []
        for i in range(0, len(wire), step):
            parser.feed(wire[i : i + step])
            if parser.parse_head():
                got.append(parser.body())
                if not parser.done:
                    assert len(parser.buf) < 32  # at most a part of a size line waits: nothing is parsed twice
        assert parser.done and (parser.status, b"".join(got)) == (200, b"".join(body))
        assert parser.buf.startswith(b"HTTP/1.1 204")  # the next answer's bytes stay

    async def through_the_protocol(step: int) -> None:
        conn = _awire._Conn()
        conn.start(Parser(conn.buf), whole=True)
        assert conn.waiter is not None
        for i in range(0, len(wire), step):
            conn.data_received(wire[i : i + step])  # once the answer is complete, bytes only pile up
        reply = conn.waiter.result()
        assert (reply.status_code, reply.content) == (200, b"".join(body))
        assert conn.buf.startswith(b"HTTP/1.1 204")

    for step in (1, 4096):
        asyncio.run(through_the_protocol(step))
