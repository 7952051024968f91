# Generated from _async.py by scripts/gen_sync.py (unasync). Do not edit: edit _async.py, run `make sdk`.
"""The SDK's sandbox object: ``Sandbox`` with ``sbx.commands``, ``sbx.files``, ``sbx.pty`` and ``sbx.git``
(httpx for streams and queries, websockets for streamed output and terminals).

This module is the source of both flavours: ``_sync.py`` is generated from it by ``scripts/gen_sync.py``
(unasync, with the name table there) and never edited by hand; ``tests/test_sdk_generated.py`` fails when the
two differ. What cannot be written once (callbacks that may be awaitable, blocking work off the event loop, the
terminal's reader) lives in ``_concurrency.py`` and ``_pty.py``, one hand-written pair each.

``timeout=`` parameters are the command's or the sandbox's lifetime (E2B naming), not a deadline of the call
itself, hence the ASYNC109 exemptions.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, overload

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import branchbox.sdk._context as _context
import branchbox.sdk._requests as rq
import branchbox.sdk._tar as _tar
import branchbox.sdk._wire as _wire
from branchbox.sdk._concurrency import call, offload
from branchbox.sdk._config import UNSET, ConnectionConfig, _Unset, default_ssl_context
from branchbox.sdk._errors import (
    ConnectionError_,
    FileNotFoundError_,
    NotFoundError,
    SandboxError,
    SandboxNotFoundError,
    TimeoutException,
)
from branchbox.sdk._models import (
    MAX_READ_BYTES,
    ArchiveInfo,
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    NetworkInfo,
    OutputCollector,
    PoolInfo,
    ProcessInfo,
    SandboxInfo,
    SnapshotInfo,
    TemplateInfo,
)
from branchbox.sdk._pty import PtyHandle
from branchbox.sdk._wire import Reply
from branchbox.sdk._workspaces import clone_command

CHUNK = 256 * 1024
Timeout = float | None | _Unset
OutputCallback = Callable[[str], object]  # (async flavour) may return an awaitable, which is awaited


class _Http:
    """Per sandbox object: pooled keep-alive connections to its daemon for small JSON requests
    (:mod:`branchbox.sdk._wire`) and its own httpx client, made on first use, for streams and queries."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.wire: _wire.Wire | None = _wire.acquire(config)
        self._client: httpx.Client | None = None
        self._closed = False

    @property
    def client(self) -> httpx.Client:
        """The httpx client, made on first use (most sandbox objects never stream)."""
        if self._closed:
            raise RuntimeError("this sandbox object was closed: connect again with Sandbox.connect()")
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.config.base_url,
                headers=self.config.headers(),
                timeout=self.config.request_timeout,
                verify=default_ssl_context(),
            )
        return self._client

    def _timeout(self, req: rq.Req, request_timeout: Timeout) -> float | None:
        if not req.use_default_timeout:
            return req.timeout
        return self.config.with_timeout(request_timeout).request_timeout

    def send(self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Any = None) -> httpx.Response | Reply:
        try:
            if content is None and not req.params and not self._closed:
                assert self.wire is not None
                body = None if req.json is None else json.dumps(req.json, separators=(",", ":")).encode("utf-8")
                resp: httpx.Response | Reply = self.wire.request(
                    req.method, req.path, body, self._timeout(req, request_timeout)
                )
            else:
                resp = self.client.request(
                    req.method,
                    req.path,
                    params=req.params or None,
                    json=req.json,
                    content=content,
                    timeout=self._timeout(req, request_timeout),
                )
        except httpx.TimeoutException as exc:
            raise TimeoutException(
                f"{req.method} {req.path} timed out: pass request_timeout= or set BRANCHBOX_REQUEST_TIMEOUT",
                code="timeout",
            ) from exc
        except httpx.TransportError as exc:
            raise ConnectionError_(
                f"cannot reach the branchbox daemon at {self.config.base_url} ({exc}): is `branchbox serve` "
                "running? set BRANCHBOX_URL or base_url=",
                code="connection_error",
            ) from exc
        rq.raise_for_status(resp.status_code, resp.content)
        return resp

    @contextmanager
    def stream(self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Any = None) -> Iterator[httpx.Response]:
        try:
            with self.client.stream(
                req.method,
                req.path,
                params=req.params or None,
                content=content,
                json=req.json,
                timeout=self._timeout(req, request_timeout),
            ) as resp:
                if resp.status_code >= 400:
                    rq.raise_for_status(resp.status_code, resp.read())
                yield resp
        except httpx.TimeoutException as exc:
            raise TimeoutException(f"{req.method} {req.path} timed out: pass request_timeout=", code="timeout") from exc
        except httpx.TransportError as exc:
            raise ConnectionError_(
                f"connection to {self.config.base_url} failed: {exc}", code="connection_error"
            ) from exc

    def ws(self, path: str, *, binary: bool, query: str = "") -> ClientConnection:
        """A WebSocket to an API path; ``query``: more of the query string, already encoded."""
        url = self.config.ws_url(path, encoding="base64" if binary else "text") + (f"&{query}" if query else "")
        try:
            ws = connect(
                url,
                additional_headers=self.config.headers(),
                open_timeout=self.config.request_timeout,
                max_size=None,
                compression=None,
                proxy=None,
            )
        except InvalidStatus as exc:
            rq.raise_for_status(exc.response.status_code, bytes(exc.response.body or b""))
            raise
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ConnectionError_(f"WebSocket to {url} failed: {exc}", code="connection_error") from exc
        return ws.__enter__()  # entered here: the caller owns it (a terminal's handle may outlive a block)

    def close(self) -> None:
        self._closed = True
        if self.wire is not None:
            _wire.release(self.config, self.wire)
            self.wire = None
        if self._client is not None:
            self._client.close()


def _oneshot(request: rq.Req, *, base_url: str | None, api_key: str | None, request_timeout: Timeout) -> Any:
    """One daemon-wide request (list, templates, pools, snapshots) on a connection of its own."""
    http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
    try:
        return http.send(request)
    finally:
        http.close()


def _consume(
    ws: ClientConnection,
    *,
    binary: bool,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    max_output: int | None = None,
) -> CommandResult:
    t0 = time.perf_counter()
    kept = OutputCollector() if max_output is None else OutputCollector(max_output)
    try:
        for raw in ws:
            ev = rq.parse_event(raw, binary=binary)
            if ev.kind == "stdout":
                kept.add("stdout", ev.text)
                call(on_stdout, ev.text)
            elif ev.kind == "stderr":
                kept.add("stderr", ev.text)
                call(on_stderr, ev.text)
            elif ev.kind == "exit":
                return kept.result(ev.exit_code, ev.signal, (time.perf_counter() - t0) * 1000)
            elif ev.error is not None:
                raise ev.error
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc
    raise rq.ws_close_error(ws.close_code, ws.close_reason or "")


class CommandHandle:
    """A background command: ``wait()`` for its result, ``kill()`` it."""

    def __init__(self, sandbox: Sandbox, pid: int) -> None:
        self._sandbox = sandbox
        self.pid = pid

    def wait(
        self, *, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None
    ) -> CommandResult:
        """Attach and stream output until the command exits (the agent replays a bounded tail of earlier output)."""
        path = f"/v1/sandboxes/{self._sandbox.sandbox_id}/commands/{self.pid}/attach"
        ws = self._sandbox._http.ws(path, binary=False)
        with ws:
            return _consume(ws, binary=False, on_stdout=on_stdout, on_stderr=on_stderr)

    def kill(self, signal: int = 9) -> bool:
        return self._sandbox.commands.kill(self.pid, signal=signal)


class Commands:
    """``sbx.commands``: run, list, kill, connect."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = ...,
        envs: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        user: str | None = ...,
        stdin: str | None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        timeout: float | None = ...,
        tag: str | None = ...,
        max_output: int | None = ...,
        request_timeout: Timeout = ...,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        envs: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        user: str | None = ...,
        stdin: str | None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        timeout: float | None = ...,
        tag: str | None = ...,
        max_output: int | None = ...,
        request_timeout: Timeout = ...,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = 60.0,
        tag: str | None = None,
        max_output: int | None = None,
        request_timeout: Timeout = UNSET,
    ) -> CommandResult | CommandHandle:
        """Run ``cmd`` (a string runs under /bin/sh -c). ``timeout`` (s) limits the command; None: no limit.

        With ``on_stdout``/``on_stderr`` the output streams over a WebSocket as it is produced (the async
        flavour's callbacks may be coroutine functions). The result keeps at most ``max_output`` of each stream
        (default and ceiling of a plain run: the daemon's max_output_mb, 64 MiB; a streamed run: 64 Mi
        characters) and says ``stdout_truncated`` / ``stderr_truncated`` when more came; callbacks get all.
        ``background=True`` returns a :class:`CommandHandle` at once.
        """
        sid = self._sandbox.sandbox_id
        http = self._sandbox._http
        if background:
            req = rq.run_command(
                sid,
                cmd,
                background=True,
                envs=envs,
                cwd=cwd,
                user=user,
                stdin=None,
                timeout=timeout,
                tag=tag,
                request_timeout=None,
            )
            pid = int((http.send(req, request_timeout=request_timeout)).json()["pid"])
            return CommandHandle(self._sandbox, pid)
        if on_stdout is None and on_stderr is None:
            rt = http.config.with_timeout(request_timeout).request_timeout
            req = rq.run_command(
                sid,
                cmd,
                background=False,
                envs=envs,
                cwd=cwd,
                user=user,
                stdin=stdin,
                timeout=timeout,
                tag=tag,
                request_timeout=rt,
                max_output=max_output,
            )
            if not isinstance(request_timeout, _Unset):  # an explicit per-call limit wins
                req = dataclasses.replace(req, timeout=request_timeout)
            return CommandResult.from_json((http.send(req)).json())
        start = rq.stream_start(cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, tag=tag, stdin=stdin is not None)
        ws = http.ws(f"/v1/sandboxes/{sid}/commands/stream", binary=False)
        with ws:
            ws.send(start)
            if stdin is not None:
                ws.send(rq.stdin_frame(stdin, binary=False))
                ws.send(rq.CLOSE_STDIN)
            return _consume(ws, binary=False, on_stdout=on_stdout, on_stderr=on_stderr, max_output=max_output)

    def list(self, *, request_timeout: Timeout = UNSET) -> list[ProcessInfo]:
        resp = self._sandbox._http.send(rq.list_commands(self._sandbox.sandbox_id), request_timeout=request_timeout)
        return [ProcessInfo.from_json(p) for p in resp.json()]

    def kill(self, pid: int, *, signal: int = 9, request_timeout: Timeout = UNSET) -> bool:
        """Send ``signal``; False when there is no such process."""
        try:
            self._sandbox._http.send(
                rq.kill_command(self._sandbox.sandbox_id, pid, signal), request_timeout=request_timeout
            )
        except NotFoundError as exc:
            if exc.code == "process_not_found":
                return False
            raise
        return True

    def connect(self, pid: int) -> CommandHandle:
        """A handle on a running process (``wait()`` streams its output)."""
        return CommandHandle(self._sandbox, pid)


class Files:
    """``sbx.files``: read, write, list, stat, mkdir, remove, rename; streamed upload and download."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @property
    def _sid(self) -> str:
        return self._sandbox.sandbox_id

    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["text"] = ...,
        max_size: int | None = ...,
        request_timeout: Timeout = ...,
    ) -> str: ...
    @overload
    def read(
        self, path: str, *, format: Literal["bytes"], max_size: int | None = ..., request_timeout: Timeout = ...
    ) -> bytes: ...
    def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes"] = "text",
        max_size: int | None = MAX_READ_BYTES,
        request_timeout: Timeout = UNSET,
    ) -> str | bytes:
        """The whole file. One larger than ``max_size`` bytes (64 MiB; None: no limit) raises BadRequestError
        (``payload_too_large``) before anything is sent: stream it with :meth:`download` instead."""
        req = rq.read_file(self._sid, path, max_size)
        resp = self._sandbox._http.send(req, request_timeout=request_timeout)
        return resp.content.decode("utf-8") if format == "text" else resp.content

    def download(self, path: str, target: str | Path | IO[bytes], *, request_timeout: Timeout = UNSET) -> int:
        """Stream a sandbox file into a local path or binary file object; returns the byte count."""
        return self._save(rq.read_file(self._sid, path), target, request_timeout)

    def download_archive(self, path: str, target: str | Path | IO[bytes], *, request_timeout: Timeout = UNSET) -> int:
        """Stream a tar of a sandbox path into a local path or binary file object; returns the byte count. A
        directory's members are named relative to it; a file is one member under its own name."""
        return self._save(rq.read_archive(self._sid, path), target, request_timeout)

    def _save(self, req: rq.Req, target: str | Path | IO[bytes], request_timeout: Timeout) -> int:
        n = 0
        with self._sandbox._http.stream(req, request_timeout=request_timeout) as resp:
            f = open(target, "wb") if isinstance(target, str | Path) else target  # noqa: SIM115, ASYNC230
            try:
                for chunk in resp.iter_bytes(CHUNK):
                    f.write(chunk)
                    n += len(chunk)
            finally:
                if f is not target:
                    f.close()
        return n

    def write_archive(self, path: str, data: bytes | IO[bytes], *, request_timeout: Timeout = UNSET) -> ArchiveInfo:
        """Unpack an uncompressed tar (bytes or a binary file object, streamed) into the sandbox directory
        ``path``, created with its parents: existing files are replaced, directories merged into."""
        content = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else _chunks(data)
        resp = self._sandbox._http.send(
            rq.write_archive(self._sid, path), request_timeout=request_timeout, content=content
        )
        return ArchiveInfo.from_json(resp.json())

    def upload_dir(self, local_dir: str | Path, path: str, *, request_timeout: Timeout = UNSET) -> ArchiveInfo:
        """Copy a local directory's contents into the sandbox directory ``path`` (one streamed tar)."""
        with offload(_tar.pack_dir, local_dir) as packed:
            return self.write_archive(path, packed, request_timeout=request_timeout)

    def download_dir(
        self,
        path: str,
        local_dir: str | Path,
        *,
        on_skipped: Callable[[str, str], object] | None = None,
        request_timeout: Timeout = UNSET,
    ) -> int:
        """Copy a sandbox directory's contents into ``local_dir`` (created); returns the entries written. The
        tar is checked member by member: nothing is written outside ``local_dir``; symlinks pointing out of it
        and devices are left out (``on_skipped(name, why)`` hears of each; in the async flavour from a
        worker thread)."""
        with tempfile.SpooledTemporaryFile(_tar.SPOOL) as spool:
            self._save(rq.read_archive(self._sid, path), spool, request_timeout)
            spool.seek(0)
            return offload(_tar.unpack, spool, local_dir, on_skipped)

    def write(
        self,
        path: str,
        data: str | bytes | IO[bytes],
        *,
        mode: int | None = None,
        request_timeout: Timeout = UNSET,
    ) -> EntryInfo:
        """Write a file (parents are created). A file object is streamed in chunks."""
        content: Any
        if isinstance(data, str):
            content = data.encode("utf-8")
        elif isinstance(data, bytes | bytearray | memoryview):
            content = bytes(data)
        else:
            content = _chunks(data)
        resp = self._sandbox._http.send(
            rq.write_file(self._sid, path, mode), request_timeout=request_timeout, content=content
        )
        return EntryInfo.from_json(resp.json())

    def upload(self, path: str, source: str | Path, *, mode: int | None = None) -> EntryInfo:
        """Stream a local file into the sandbox."""
        with open(source, "rb") as f:  # noqa: ASYNC230 - reads are chunked and small
            return self.write(path, f, mode=mode)

    def list(self, path: str, *, depth: int = 1, request_timeout: Timeout = UNSET) -> list[EntryInfo]:
        resp = self._sandbox._http.send(rq.list_files(self._sid, path, depth), request_timeout=request_timeout)
        return [EntryInfo.from_json(e) for e in resp.json()]

    def get_info(self, path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = self._sandbox._http.send(rq.stat(self._sid, path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    def exists(self, path: str) -> bool:
        try:
            self.get_info(path)
        except FileNotFoundError_:
            return False
        return True

    def make_dir(self, path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = self._sandbox._http.send(rq.mkdir(self._sid, path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    def remove(self, path: str, *, recursive: bool = False, request_timeout: Timeout = UNSET) -> None:
        self._sandbox._http.send(rq.remove(self._sid, path, recursive), request_timeout=request_timeout)

    def rename(self, old_path: str, new_path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = self._sandbox._http.send(rq.rename(self._sid, old_path, new_path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    @contextmanager
    def watch_dir(self, path: str, *, recursive: bool = False) -> Iterator[Iterator[FilesystemEvent]]:
        """Watch a sandbox directory (inotify, in the sandbox): iterate what the block gets for its changes as
        they happen, until the block ends or the directory is removed. ``recursive``: its subdirectories too, new
        ones as they appear. Each :class:`FilesystemEvent` has a ``type`` (create, write, remove, rename: the old
        name, chmod; overflow: events were lost) and a ``name`` relative to ``path``. Events made after the
        ``with`` line are all seen::

            with sbx.files.watch_dir("/work", recursive=True) as events:
                for event in events:
                    print(event.type, event.name)
        """
        ws = self._sandbox._http.ws(rq.watch_path(self._sid), binary=False, query=rq.watch_query(path, recursive))
        try:
            try:
                rq.watch_message(ws.recv())  # "started": the watches are in place (or the error raises)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc
            yield _watch_events(ws)
        finally:
            ws.close()


def _watch_events(ws: ClientConnection) -> Iterator[FilesystemEvent]:
    try:
        for raw in ws:
            item = rq.watch_message(raw)
            if item == "end":
                return
            if isinstance(item, FilesystemEvent):
                yield item
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


class Pty:
    """``sbx.pty``: interactive terminals."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def create(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        on_data: Callable[[bytes], object] | None = None,
        cmd: str | Sequence[str] | None = None,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> PtyHandle:
        ws = self._sandbox._http.ws(f"/v1/sandboxes/{self._sandbox.sandbox_id}/pty", binary=True)
        try:
            ws.send(rq.pty_start(cols=cols, rows=rows, cmd=cmd, envs=envs, cwd=cwd, user=user, timeout=timeout))
            handle = PtyHandle(ws, on_data)
            handle.wait_started()
        except BaseException:
            ws.close()
            raise
        return handle


class Git:
    """``sbx.git``: git inside a sandbox (runs through the agent)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def clone(
        self, url: str, path: str | None = None, *, branch: str | None = None, depth: int | None = None,
        token: str | None = None, cwd: str | None = None, timeout: float | None = 600,
    ) -> CommandResult:  # fmt: skip
        """``git clone`` inside the sandbox (it needs network access to the server). Raises on failure."""
        argv, env = clone_command(url, path, branch=branch, depth=depth, token=token)
        return self._sbx.commands.run(shlex.join(argv), envs=env, cwd=cwd, timeout=timeout)


class Sandbox:
    """A sandbox on a branchbox daemon. Make one with :meth:`create` or :meth:`connect`.

    ``with Sandbox.create() as sbx:`` kills the sandbox at the end of the block.
    """

    def __init__(self, info: SandboxInfo, http: _Http) -> None:
        self._info = info
        self._http = http
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)
        self.git = Git(self)  # git inside the sandbox: sbx.git.clone(...)

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        """What the daemon said at create/connect time (``get_info()`` asks again)."""
        return self._info

    @classmethod
    def create(
        cls,
        template: str = "default",
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        backend: str | None = None,
        hostname: str | None = None,
        snapshot: str | None = None,
        allow_internet_access: bool | None = None,
        network: Mapping[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> Sandbox:
        """Create a sandbox. ``timeout`` is its lifetime in seconds (None: the daemon's default).

        ``snapshot`` (id or name) restores that snapshot into the new sandbox (its template wins). ``disk_mb``
        limits what the sandbox may write (MiB; None: the daemon's default): past it, writes inside fail with
        "Disk quota exceeded"."""
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
        try:
            req = rq.create_sandbox(
                template=template,
                timeout=timeout,
                metadata=metadata,
                envs=envs,
                cpu=cpu,
                memory_mb=memory_mb,
                pids=pids,
                disk_mb=disk_mb,
                backend=backend,
                hostname=hostname,
                snapshot=snapshot,
                allow_internet_access=allow_internet_access,
                network=network,
            )
            info = SandboxInfo.from_json((http.send(req)).json())
        except BaseException:
            http.close()
            raise
        return cls(info, http)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> Sandbox:
        """Connect to an existing sandbox by id."""
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
        try:
            info = SandboxInfo.from_json((http.send(rq.get_sandbox(sandbox_id))).json())
        except BaseException:
            http.close()
            raise
        return cls(info, http)

    @staticmethod
    def list(
        *,
        metadata: Mapping[str, str] | None = None,
        state: Sequence[str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> list[SandboxInfo]:
        """Sandboxes whose metadata has all the given pairs (and, if given, in one of ``state``)."""
        resp = _oneshot(
            rq.list_sandboxes(metadata=metadata, state=state),
            base_url=base_url,
            api_key=api_key,
            request_timeout=request_timeout,
        )
        return [SandboxInfo.from_json(d) for d in resp.json()]

    @staticmethod
    def templates(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[TemplateInfo]:
        return [
            TemplateInfo.from_json(d)
            for d in (
                _oneshot(rq.list_templates(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    # -- warm pools (daemon-wide, like list/templates) ------------------------------------------
    @staticmethod
    def pools(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[PoolInfo]:
        """Statistics of every warm pool on the daemon."""
        return [
            PoolInfo.from_json(d)
            for d in (
                _oneshot(rq.list_pools(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    @staticmethod
    def get_pool(
        template: str,
        *,
        backend: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> PoolInfo:
        """Statistics of the warm pool of ``template`` on ``backend`` (default: the daemon's; NotFoundError if
        it has none)."""
        return PoolInfo.from_json(
            (
                _oneshot(
                    rq.get_pool(template, backend), base_url=base_url, api_key=api_key, request_timeout=request_timeout
                )
            ).json()
        )

    @staticmethod
    def configure_pool(
        template: str,
        *,
        backend: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        target_free: int | None = None,
        max_memory_mb: int | None = None,
        max_parallel_boots: int | None = None,
        reuse: bool | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> PoolInfo:
        """Create or replace the warm pool of ``template`` on ``backend`` (default: the daemon's default
        backend; each backend has pools of its own), live. Settings not given take the daemon's defaults.

        Creates with the pool's ``cpu``/``memory_mb``/``pids`` are served from it.
        """
        settings = {
            "min_size": min_size, "max_size": max_size, "target_free": target_free, "max_memory_mb": max_memory_mb,
            "max_parallel_boots": max_parallel_boots, "reuse": reuse, "cpu": cpu, "memory_mb": memory_mb,
            "pids": pids,
        }  # fmt: skip
        return PoolInfo.from_json(
            (
                _oneshot(
                    rq.configure_pool(template, settings, backend),
                    base_url=base_url,
                    api_key=api_key,
                    request_timeout=request_timeout,
                )
            ).json()
        )

    @staticmethod
    def remove_pool(
        template: str,
        *,
        backend: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> None:
        """Remove the warm pool of ``template`` on ``backend``; its ready members are destroyed (claimed
        sandboxes stay)."""
        _oneshot(rq.remove_pool(template, backend), base_url=base_url, api_key=api_key, request_timeout=request_timeout)

    # -- snapshots, forks, reset -------------------------------------------------------------------
    def create_snapshot(self, *, name: str | None = None, request_timeout: Timeout = UNSET) -> SnapshotInfo:
        """Capture the sandbox's files (frozen meanwhile, then thawed) into an immutable snapshot."""
        resp = self._http.send(rq.create_snapshot(self.sandbox_id, name), request_timeout=request_timeout)
        return SnapshotInfo.from_json(resp.json())

    def fork(self, *, count: int = 1, request_timeout: Timeout = UNSET) -> builtins.list[Sandbox | SandboxError]:
        """``count`` new sandboxes continuing from this one's current files (not its processes, on containers).

        One entry per child, in order: a sandbox object or the exception that child met."""
        body = (self._http.send(rq.fork(self.sandbox_id, count), request_timeout=request_timeout)).json()
        return [
            r if isinstance(r, SandboxError) else Sandbox(SandboxInfo.from_json(r), _Http(self._http.config))
            for r in rq.parse_fork(body)
        ]

    def reset(self, snapshot: str | None = None, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        """Back to its template (or to ``snapshot``): processes, files and /tmp are discarded; same id."""
        resp = self._http.send(rq.reset(self.sandbox_id, snapshot), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    @staticmethod
    def snapshots(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[SnapshotInfo]:
        return [
            SnapshotInfo.from_json(d)
            for d in (
                _oneshot(rq.list_snapshots(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    @staticmethod
    def get_snapshot(
        snapshot: str, *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> SnapshotInfo:
        return SnapshotInfo.from_json(
            (
                _oneshot(rq.get_snapshot(snapshot), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        )

    @staticmethod
    def delete_snapshot(
        snapshot: str, *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> None:
        """Delete a snapshot (sandboxes made from it keep working)."""
        _oneshot(rq.delete_snapshot(snapshot), base_url=base_url, api_key=api_key, request_timeout=request_timeout)

    def get_info(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = self._http.send(rq.get_sandbox(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def is_running(self) -> bool:
        try:
            return (self.get_info()).state == "running"
        except NotFoundError:
            return False

    def get_network(self, *, request_timeout: Timeout = UNSET) -> NetworkInfo:
        """The sandbox's address and egress policy."""
        resp = self._http.send(rq.get_network(self.sandbox_id), request_timeout=request_timeout)
        return NetworkInfo.from_json(resp.json())

    def update_network(self, patch: Mapping[str, Any], *, request_timeout: Timeout = UNSET) -> NetworkInfo:
        """Change the egress policy live: keys given (``allow_out``, ``deny_out``, ``allow_internet_access``)
        replace the current values, absent keys stay. E.g. ``update_network({"deny_out": []})``."""
        resp = self._http.send(rq.update_network(self.sandbox_id, patch), request_timeout=request_timeout)
        return NetworkInfo.from_json(resp.json())

    def get_host(self, port: int) -> str:
        """A URL served by the daemon that reaches ``port`` inside the sandbox (HTTP; use ws:// for WebSocket).

        When the client has an API key the URL carries the sandbox's port token, so it works without one."""
        token = None
        if self._http.config.api_key:
            token = (self.get_network()).port_token
        return rq.host_url(self._http.config.base_url, self.sandbox_id, port, token)

    def set_timeout(self, timeout: float | None, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        """The sandbox now lives ``timeout`` more seconds (None: no timeout)."""
        resp = self._http.send(rq.set_timeout(self.sandbox_id, timeout), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def pause(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = self._http.send(rq.pause(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def resume(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = self._http.send(rq.resume(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    def kill(self, *, request_timeout: Timeout = UNSET) -> bool:
        """Destroy the sandbox; False if it was already gone."""
        try:
            self._http.send(rq.kill_sandbox(self.sandbox_id), request_timeout=request_timeout)
        except SandboxNotFoundError:
            return False
        return True

    def close(self) -> None:
        """Release HTTP connections (the sandbox keeps running). Idle keep-alive connections stay pooled per
        daemon for the next sandbox object (sync: for the whole process; async: for the event loop, until its
        last user closes)."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        except SandboxError:
            pass
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, template={self._info.template_id!r})"


class Template:
    """Templates built by the daemon: ``Template.build(context, name=...)`` (a Dockerfile build)."""

    @staticmethod
    def build(
        context: str | Path,
        *,
        name: str,
        dockerfile: str | Path | None = None,
        build_args: Mapping[str, str] | None = None,
        on_log: OutputCallback | None = None,
        on_event: Callable[[dict[str, Any]], object] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> TemplateInfo:
        """Build template ``name`` from a Dockerfile (default ``CONTEXT/Dockerfile``) and the directory
        ``context`` (sent as a tar, minus what its ``.dockerignore`` excludes; symlinks are sent as links).

        ``build_args``: values of the Dockerfile's ARGs. ``on_log`` gets the output of RUN steps as it comes;
        ``on_event`` every event of the build log (step, cached/running, log, commit, built: docs/api.md). A
        failed build raises the daemon's error (``invalid_template_spec`` for a bad Dockerfile,
        ``template_not_found`` for an unknown FROM, ``template_build_failed`` with the step's line, exit code
        and last output lines for a failing RUN) and leaves no template behind."""
        packed, inside = offload(_context.pack_context, context, dockerfile)
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key))
        try:
            with packed:
                req = rq.build_template(name, inside, build_args)
                with http.stream(req, content=_chunks(packed)) as resp:
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        event = rq.build_event(line.encode())
                        call(on_event, event)
                        if event.get("type") == "log":
                            call(on_log, str(event.get("data", "")))
                        elif event.get("type") == "done":
                            return TemplateInfo.from_json(event["template"])
        finally:
            http.close()
        raise SandboxError("the build log ended without a result: the daemon stopped during the build")

    @staticmethod
    def import_image(
        reference: str,
        *,
        name: str,
        username: str | None = None,
        password: str | None = None,
        insecure: bool = False,
        on_event: Callable[[dict[str, Any]], object] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> TemplateInfo:
        """Import template ``name`` from a container image in a registry (``docker://HOST/REPO:TAG``), pulled by
        the daemon. ``username``/``password``: registry credentials; ``insecure``: plain HTTP or unverified TLS.
        ``on_event`` gets each progress event (``step`` fetch/verify/unpack/cached, ``message``, ``fraction``).
        Errors: ``invalid_image_reference`` (also a registry in a blocked range), ``image_not_found``,
        ``registry_auth_failed``, ``registry_unreachable``, ``unsupported_image``, ``image_digest_mismatch``,
        ``unsafe_image``, ``image_too_large``; a failed import leaves no template behind."""
        http = _Http(ConnectionConfig.resolve(base_url=base_url, api_key=api_key))
        try:
            req = rq.import_template(reference, name, username=username, password=password, insecure=insecure)
            with http.stream(req) as resp:
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    event = rq.build_event(line.encode())
                    call(on_event, event)
                    if event.get("type") == "done":
                        return TemplateInfo.from_json(event["template"])
        finally:
            http.close()
        raise SandboxError("the import log ended without a result: the daemon stopped during the import")
