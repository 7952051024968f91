"""The SDK's sandbox object: ``AsyncSandbox`` with ``sbx.commands``, ``sbx.files``, ``sbx.pty`` and ``sbx.git``
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, overload

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

import branchbox.sdk._awire as _awire
import branchbox.sdk._context as _context
import branchbox.sdk._requests as rq
import branchbox.sdk._tar as _tar
from branchbox.sdk._concurrency import acall, aoffload
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
from branchbox.sdk._pty import AsyncPtyHandle
from branchbox.sdk._wire import Reply
from branchbox.sdk._workspaces import clone_command

CHUNK = 256 * 1024
Timeout = float | None | _Unset
OutputCallback = Callable[[str], object]  # (async flavour) may return an awaitable, which is awaited


class _AsyncHttp:
    """Per sandbox object: pooled keep-alive connections to its daemon for small JSON requests
    (:mod:`branchbox.sdk._awire`) and its own httpx client, made on first use, for streams and queries."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.wire: _awire.AsyncWire | None = _awire.acquire(config)
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def client(self) -> httpx.AsyncClient:
        """The httpx client, made on first use (most sandbox objects never stream)."""
        if self._closed:
            raise RuntimeError("this sandbox object was closed: connect again with AsyncSandbox.connect()")
        if self._client is None:
            self._client = httpx.AsyncClient(
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

    async def send(
        self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Any = None
    ) -> httpx.Response | Reply:
        try:
            if content is None and not req.params and not self._closed:
                assert self.wire is not None
                body = None if req.json is None else json.dumps(req.json, separators=(",", ":")).encode("utf-8")
                resp: httpx.Response | Reply = await self.wire.request(
                    req.method, req.path, body, self._timeout(req, request_timeout)
                )
            else:
                resp = await self.client.request(
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

    @asynccontextmanager
    async def stream(
        self, req: rq.Req, *, request_timeout: Timeout = UNSET, content: Any = None
    ) -> AsyncIterator[httpx.Response]:
        try:
            async with self.client.stream(
                req.method,
                req.path,
                params=req.params or None,
                content=content,
                json=req.json,
                timeout=self._timeout(req, request_timeout),
            ) as resp:
                if resp.status_code >= 400:
                    rq.raise_for_status(resp.status_code, await resp.aread())
                yield resp
        except httpx.TimeoutException as exc:
            raise TimeoutException(f"{req.method} {req.path} timed out: pass request_timeout=", code="timeout") from exc
        except httpx.TransportError as exc:
            raise ConnectionError_(
                f"connection to {self.config.base_url} failed: {exc}", code="connection_error"
            ) from exc

    async def ws(self, path: str, *, binary: bool, query: str = "") -> ClientConnection:
        """A WebSocket to an API path; ``query``: more of the query string, already encoded."""
        url = self.config.ws_url(path, encoding="base64" if binary else "text") + (f"&{query}" if query else "")
        try:
            ws = await connect(
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
        return await ws.__aenter__()  # entered here: the caller owns it (a terminal's handle may outlive a block)

    async def aclose(self) -> None:
        self._closed = True
        if self.wire is not None:
            _awire.release(self.config, self.wire)
            self.wire = None
        if self._client is not None:
            await self._client.aclose()


async def _oneshot(request: rq.Req, *, base_url: str | None, api_key: str | None, request_timeout: Timeout) -> Any:
    """One daemon-wide request (list, templates, pools, snapshots) on a connection of its own."""
    http = _AsyncHttp(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
    try:
        return await http.send(request)
    finally:
        await http.aclose()


async def _consume(
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
        async for raw in ws:
            ev = rq.parse_event(raw, binary=binary)
            if ev.kind == "stdout":
                kept.add("stdout", ev.text)
                await acall(on_stdout, ev.text)
            elif ev.kind == "stderr":
                kept.add("stderr", ev.text)
                await acall(on_stderr, ev.text)
            elif ev.kind == "exit":
                return kept.result(ev.exit_code, ev.signal, (time.perf_counter() - t0) * 1000)
            elif ev.error is not None:
                raise ev.error
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc
    raise rq.ws_close_error(ws.close_code, ws.close_reason or "")


class AsyncCommandHandle:
    """A background command: ``wait()`` for its result, ``kill()`` it."""

    def __init__(self, sandbox: AsyncSandbox, pid: int) -> None:
        self._sandbox = sandbox
        self.pid = pid

    async def wait(
        self, *, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None
    ) -> CommandResult:
        """Attach and stream output until the command exits (the agent replays a bounded tail of earlier output)."""
        path = f"/v1/sandboxes/{self._sandbox.sandbox_id}/commands/{self.pid}/attach"
        ws = await self._sandbox._http.ws(path, binary=False)
        async with ws:
            return await _consume(ws, binary=False, on_stdout=on_stdout, on_stderr=on_stderr)

    async def kill(self, signal: int = 9) -> bool:
        return await self._sandbox.commands.kill(self.pid, signal=signal)


class AsyncCommands:
    """``sbx.commands``: run, list, kill, connect."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @overload
    async def run(
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
    async def run(
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
    ) -> AsyncCommandHandle: ...

    async def run(
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
    ) -> CommandResult | AsyncCommandHandle:
        """Run ``cmd`` (a string runs under /bin/sh -c). ``timeout`` (s) limits the command; None: no limit.

        With ``on_stdout``/``on_stderr`` the output streams over a WebSocket as it is produced (the async
        flavour's callbacks may be coroutine functions). The result keeps at most ``max_output`` of each stream
        (default and ceiling of a plain run: the daemon's max_output_mb, 64 MiB; a streamed run: 64 Mi
        characters) and says ``stdout_truncated`` / ``stderr_truncated`` when more came; callbacks get all.
        ``background=True`` returns a :class:`AsyncCommandHandle` at once.
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
            pid = int((await http.send(req, request_timeout=request_timeout)).json()["pid"])
            return AsyncCommandHandle(self._sandbox, pid)
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
            return CommandResult.from_json((await http.send(req)).json())
        start = rq.stream_start(cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, tag=tag, stdin=stdin is not None)
        ws = await http.ws(f"/v1/sandboxes/{sid}/commands/stream", binary=False)
        async with ws:
            await ws.send(start)
            if stdin is not None:
                await ws.send(rq.stdin_frame(stdin, binary=False))
                await ws.send(rq.CLOSE_STDIN)
            return await _consume(ws, binary=False, on_stdout=on_stdout, on_stderr=on_stderr, max_output=max_output)

    async def list(self, *, request_timeout: Timeout = UNSET) -> list[ProcessInfo]:
        resp = await self._sandbox._http.send(
            rq.list_commands(self._sandbox.sandbox_id), request_timeout=request_timeout
        )
        return [ProcessInfo.from_json(p) for p in resp.json()]

    async def kill(self, pid: int, *, signal: int = 9, request_timeout: Timeout = UNSET) -> bool:
        """Send ``signal``; False when there is no such process."""
        try:
            await self._sandbox._http.send(
                rq.kill_command(self._sandbox.sandbox_id, pid, signal), request_timeout=request_timeout
            )
        except NotFoundError as exc:
            if exc.code == "process_not_found":
                return False
            raise
        return True

    def connect(self, pid: int) -> AsyncCommandHandle:
        """A handle on a running process (``wait()`` streams its output)."""
        return AsyncCommandHandle(self._sandbox, pid)


class AsyncFiles:
    """``sbx.files``: read, write, list, stat, mkdir, remove, rename; streamed upload and download."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @property
    def _sid(self) -> str:
        return self._sandbox.sandbox_id

    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["text"] = ...,
        max_size: int | None = ...,
        request_timeout: Timeout = ...,
    ) -> str: ...
    @overload
    async def read(
        self, path: str, *, format: Literal["bytes"], max_size: int | None = ..., request_timeout: Timeout = ...
    ) -> bytes: ...
    async def read(
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
        resp = await self._sandbox._http.send(req, request_timeout=request_timeout)
        return resp.content.decode("utf-8") if format == "text" else resp.content

    async def download(self, path: str, target: str | Path | IO[bytes], *, request_timeout: Timeout = UNSET) -> int:
        """Stream a sandbox file into a local path or binary file object; returns the byte count."""
        return await self._save(rq.read_file(self._sid, path), target, request_timeout)

    async def download_archive(
        self, path: str, target: str | Path | IO[bytes], *, request_timeout: Timeout = UNSET
    ) -> int:
        """Stream a tar of a sandbox path into a local path or binary file object; returns the byte count. A
        directory's members are named relative to it; a file is one member under its own name."""
        return await self._save(rq.read_archive(self._sid, path), target, request_timeout)

    async def _save(self, req: rq.Req, target: str | Path | IO[bytes], request_timeout: Timeout) -> int:
        n = 0
        async with self._sandbox._http.stream(req, request_timeout=request_timeout) as resp:
            f = open(target, "wb") if isinstance(target, str | Path) else target  # noqa: SIM115, ASYNC230
            try:
                async for chunk in resp.aiter_bytes(CHUNK):
                    f.write(chunk)
                    n += len(chunk)
            finally:
                if f is not target:
                    f.close()
        return n

    async def write_archive(
        self, path: str, data: bytes | IO[bytes], *, request_timeout: Timeout = UNSET
    ) -> ArchiveInfo:
        """Unpack an uncompressed tar (bytes or a binary file object, streamed) into the sandbox directory
        ``path``, created with its parents: existing files are replaced, directories merged into."""
        content = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else _achunks(data)
        resp = await self._sandbox._http.send(
            rq.write_archive(self._sid, path), request_timeout=request_timeout, content=content
        )
        return ArchiveInfo.from_json(resp.json())

    async def upload_dir(self, local_dir: str | Path, path: str, *, request_timeout: Timeout = UNSET) -> ArchiveInfo:
        """Copy a local directory's contents into the sandbox directory ``path`` (one streamed tar)."""
        with await aoffload(_tar.pack_dir, local_dir) as packed:
            return await self.write_archive(path, packed, request_timeout=request_timeout)

    async def download_dir(
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
            await self._save(rq.read_archive(self._sid, path), spool, request_timeout)
            spool.seek(0)
            return await aoffload(_tar.unpack, spool, local_dir, on_skipped)

    async def write(
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
            content = _achunks(data)
        resp = await self._sandbox._http.send(
            rq.write_file(self._sid, path, mode), request_timeout=request_timeout, content=content
        )
        return EntryInfo.from_json(resp.json())

    async def upload(self, path: str, source: str | Path, *, mode: int | None = None) -> EntryInfo:
        """Stream a local file into the sandbox."""
        with open(source, "rb") as f:  # noqa: ASYNC230 - reads are chunked and small
            return await self.write(path, f, mode=mode)

    async def list(self, path: str, *, depth: int = 1, request_timeout: Timeout = UNSET) -> list[EntryInfo]:
        resp = await self._sandbox._http.send(rq.list_files(self._sid, path, depth), request_timeout=request_timeout)
        return [EntryInfo.from_json(e) for e in resp.json()]

    async def get_info(self, path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = await self._sandbox._http.send(rq.stat(self._sid, path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    async def exists(self, path: str) -> bool:
        try:
            await self.get_info(path)
        except FileNotFoundError_:
            return False
        return True

    async def make_dir(self, path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = await self._sandbox._http.send(rq.mkdir(self._sid, path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    async def remove(self, path: str, *, recursive: bool = False, request_timeout: Timeout = UNSET) -> None:
        await self._sandbox._http.send(rq.remove(self._sid, path, recursive), request_timeout=request_timeout)

    async def rename(self, old_path: str, new_path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = await self._sandbox._http.send(rq.rename(self._sid, old_path, new_path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    @asynccontextmanager
    async def watch_dir(self, path: str, *, recursive: bool = False) -> AsyncIterator[AsyncIterator[FilesystemEvent]]:
        """Watch a sandbox directory (inotify, in the sandbox): iterate what the block gets for its changes as
        they happen, until the block ends or the directory is removed. ``recursive``: its subdirectories too, new
        ones as they appear. Each :class:`FilesystemEvent` has a ``type`` (create, write, remove, rename: the old
        name, chmod; overflow: events were lost) and a ``name`` relative to ``path``. Events made after the
        ``with`` line are all seen::

            async with sbx.files.watch_dir("/work", recursive=True) as events:
                async for event in events:
                    print(event.type, event.name)
        """
        ws = await self._sandbox._http.ws(rq.watch_path(self._sid), binary=False, query=rq.watch_query(path, recursive))
        try:
            try:
                rq.watch_message(await ws.recv())  # "started": the watches are in place (or the error raises)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc
            yield _watch_events(ws)
        finally:
            await ws.close()


async def _watch_events(ws: ClientConnection) -> AsyncIterator[FilesystemEvent]:
    try:
        async for raw in ws:
            item = rq.watch_message(raw)
            if item == "end":
                return
            if isinstance(item, FilesystemEvent):
                yield item
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc


async def _achunks(f: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


class AsyncPty:
    """``sbx.pty``: interactive terminals."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def create(
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
    ) -> AsyncPtyHandle:
        ws = await self._sandbox._http.ws(f"/v1/sandboxes/{self._sandbox.sandbox_id}/pty", binary=True)
        try:
            await ws.send(rq.pty_start(cols=cols, rows=rows, cmd=cmd, envs=envs, cwd=cwd, user=user, timeout=timeout))
            handle = AsyncPtyHandle(ws, on_data)
            await handle.wait_started()
        except BaseException:
            await ws.close()
            raise
        return handle


class AsyncGit:
    """``sbx.git``: git inside a sandbox (runs through the agent)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sbx = sandbox

    async def clone(
        self, url: str, path: str | None = None, *, branch: str | None = None, depth: int | None = None,
        token: str | None = None, cwd: str | None = None, timeout: float | None = 600,
    ) -> CommandResult:  # fmt: skip
        """``git clone`` inside the sandbox (it needs network access to the server). Raises on failure."""
        argv, env = clone_command(url, path, branch=branch, depth=depth, token=token)
        return await self._sbx.commands.run(shlex.join(argv), envs=env, cwd=cwd, timeout=timeout)


class AsyncSandbox:
    """A sandbox on a branchbox daemon. Make one with :meth:`create` or :meth:`connect`.

    ``async with await AsyncSandbox.create() as sbx:`` kills the sandbox at the end of the block.
    """

    def __init__(self, info: SandboxInfo, http: _AsyncHttp) -> None:
        self._info = info
        self._http = http
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self)
        self.git = AsyncGit(self)  # git inside the sandbox: sbx.git.clone(...)

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        """What the daemon said at create/connect time (``get_info()`` asks again)."""
        return self._info

    @classmethod
    async def create(
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
    ) -> AsyncSandbox:
        """Create a sandbox. ``timeout`` is its lifetime in seconds (None: the daemon's default).

        ``snapshot`` (id or name) restores that snapshot into the new sandbox (its template wins). ``disk_mb``
        limits what the sandbox may write (MiB; None: the daemon's default): past it, writes inside fail with
        "Disk quota exceeded"."""
        http = _AsyncHttp(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
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
            info = SandboxInfo.from_json((await http.send(req)).json())
        except BaseException:
            await http.aclose()
            raise
        return cls(info, http)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> AsyncSandbox:
        """Connect to an existing sandbox by id."""
        http = _AsyncHttp(ConnectionConfig.resolve(base_url=base_url, api_key=api_key, request_timeout=request_timeout))
        try:
            info = SandboxInfo.from_json((await http.send(rq.get_sandbox(sandbox_id))).json())
        except BaseException:
            await http.aclose()
            raise
        return cls(info, http)

    @staticmethod
    async def list(
        *,
        metadata: Mapping[str, str] | None = None,
        state: Sequence[str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> list[SandboxInfo]:
        """Sandboxes whose metadata has all the given pairs (and, if given, in one of ``state``)."""
        resp = await _oneshot(
            rq.list_sandboxes(metadata=metadata, state=state),
            base_url=base_url,
            api_key=api_key,
            request_timeout=request_timeout,
        )
        return [SandboxInfo.from_json(d) for d in resp.json()]

    @staticmethod
    async def templates(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[TemplateInfo]:
        return [
            TemplateInfo.from_json(d)
            for d in (
                await _oneshot(rq.list_templates(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    # -- warm pools (daemon-wide, like list/templates) ------------------------------------------
    @staticmethod
    async def pools(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[PoolInfo]:
        """Statistics of every warm pool on the daemon."""
        return [
            PoolInfo.from_json(d)
            for d in (
                await _oneshot(rq.list_pools(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    @staticmethod
    async def get_pool(
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
                await _oneshot(
                    rq.get_pool(template, backend), base_url=base_url, api_key=api_key, request_timeout=request_timeout
                )
            ).json()
        )

    @staticmethod
    async def configure_pool(
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
                await _oneshot(
                    rq.configure_pool(template, settings, backend),
                    base_url=base_url,
                    api_key=api_key,
                    request_timeout=request_timeout,
                )
            ).json()
        )

    @staticmethod
    async def remove_pool(
        template: str,
        *,
        backend: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        request_timeout: Timeout = UNSET,
    ) -> None:
        """Remove the warm pool of ``template`` on ``backend``; its ready members are destroyed (claimed
        sandboxes stay)."""
        await _oneshot(
            rq.remove_pool(template, backend), base_url=base_url, api_key=api_key, request_timeout=request_timeout
        )

    # -- snapshots, forks, reset -------------------------------------------------------------------
    async def create_snapshot(self, *, name: str | None = None, request_timeout: Timeout = UNSET) -> SnapshotInfo:
        """Capture the sandbox's files (frozen meanwhile, then thawed) into an immutable snapshot."""
        resp = await self._http.send(rq.create_snapshot(self.sandbox_id, name), request_timeout=request_timeout)
        return SnapshotInfo.from_json(resp.json())

    async def fork(
        self, *, count: int = 1, request_timeout: Timeout = UNSET
    ) -> builtins.list[AsyncSandbox | SandboxError]:
        """``count`` new sandboxes continuing from this one's current files (not its processes, on containers).

        One entry per child, in order: a sandbox object or the exception that child met."""
        body = (await self._http.send(rq.fork(self.sandbox_id, count), request_timeout=request_timeout)).json()
        return [
            r if isinstance(r, SandboxError) else AsyncSandbox(SandboxInfo.from_json(r), _AsyncHttp(self._http.config))
            for r in rq.parse_fork(body)
        ]

    async def reset(self, snapshot: str | None = None, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        """Back to its template (or to ``snapshot``): processes, files and /tmp are discarded; same id."""
        resp = await self._http.send(rq.reset(self.sandbox_id, snapshot), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    @staticmethod
    async def snapshots(
        *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> builtins.list[SnapshotInfo]:
        return [
            SnapshotInfo.from_json(d)
            for d in (
                await _oneshot(rq.list_snapshots(), base_url=base_url, api_key=api_key, request_timeout=request_timeout)
            ).json()
        ]

    @staticmethod
    async def get_snapshot(
        snapshot: str, *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> SnapshotInfo:
        return SnapshotInfo.from_json(
            (
                await _oneshot(
                    rq.get_snapshot(snapshot), base_url=base_url, api_key=api_key, request_timeout=request_timeout
                )
            ).json()
        )

    @staticmethod
    async def delete_snapshot(
        snapshot: str, *, base_url: str | None = None, api_key: str | None = None, request_timeout: Timeout = UNSET
    ) -> None:
        """Delete a snapshot (sandboxes made from it keep working)."""
        await _oneshot(
            rq.delete_snapshot(snapshot), base_url=base_url, api_key=api_key, request_timeout=request_timeout
        )

    async def get_info(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = await self._http.send(rq.get_sandbox(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    async def is_running(self) -> bool:
        try:
            return (await self.get_info()).state == "running"
        except NotFoundError:
            return False

    async def get_network(self, *, request_timeout: Timeout = UNSET) -> NetworkInfo:
        """The sandbox's address and egress policy."""
        resp = await self._http.send(rq.get_network(self.sandbox_id), request_timeout=request_timeout)
        return NetworkInfo.from_json(resp.json())

    async def update_network(self, patch: Mapping[str, Any], *, request_timeout: Timeout = UNSET) -> NetworkInfo:
        """Change the egress policy live: keys given (``allow_out``, ``deny_out``, ``allow_internet_access``)
        replace the current values, absent keys stay. E.g. ``update_network({"deny_out": []})``."""
        resp = await self._http.send(rq.update_network(self.sandbox_id, patch), request_timeout=request_timeout)
        return NetworkInfo.from_json(resp.json())

    async def get_host(self, port: int) -> str:
        """A URL served by the daemon that reaches ``port`` inside the sandbox (HTTP; use ws:// for WebSocket).

        When the client has an API key the URL carries the sandbox's port token, so it works without one."""
        token = None
        if self._http.config.api_key:
            token = (await self.get_network()).port_token
        return rq.host_url(self._http.config.base_url, self.sandbox_id, port, token)

    async def set_timeout(self, timeout: float | None, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        """The sandbox now lives ``timeout`` more seconds (None: no timeout)."""
        resp = await self._http.send(rq.set_timeout(self.sandbox_id, timeout), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    async def pause(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = await self._http.send(rq.pause(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    async def resume(self, *, request_timeout: Timeout = UNSET) -> SandboxInfo:
        resp = await self._http.send(rq.resume(self.sandbox_id), request_timeout=request_timeout)
        self._info = SandboxInfo.from_json(resp.json())
        return self._info

    async def kill(self, *, request_timeout: Timeout = UNSET) -> bool:
        """Destroy the sandbox; False if it was already gone."""
        try:
            await self._http.send(rq.kill_sandbox(self.sandbox_id), request_timeout=request_timeout)
        except SandboxNotFoundError:
            return False
        return True

    async def close(self) -> None:
        """Release HTTP connections (the sandbox keeps running). Idle keep-alive connections stay pooled per
        daemon for the next sandbox object (sync: for the whole process; async: for the event loop, until its
        last user closes)."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.kill()
        except SandboxError:
            pass
        finally:
            await self.close()

    def __repr__(self) -> str:
        return f"AsyncSandbox(sandbox_id={self.sandbox_id!r}, template={self._info.template_id!r})"


class AsyncTemplate:
    """Templates built by the daemon: ``await AsyncTemplate.build(context, name=...)`` (a Dockerfile build)."""

    @staticmethod
    async def build(
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
        packed, inside = await aoffload(_context.pack_context, context, dockerfile)
        http = _AsyncHttp(ConnectionConfig.resolve(base_url=base_url, api_key=api_key))
        try:
            with packed:
                req = rq.build_template(name, inside, build_args)
                async with http.stream(req, content=_achunks(packed)) as resp:
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        event = rq.build_event(line.encode())
                        await acall(on_event, event)
                        if event.get("type") == "log":
                            await acall(on_log, str(event.get("data", "")))
                        elif event.get("type") == "done":
                            return TemplateInfo.from_json(event["template"])
        finally:
            await http.aclose()
        raise SandboxError("the build log ended without a result: the daemon stopped during the build")

    @staticmethod
    async def import_image(
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
        http = _AsyncHttp(ConnectionConfig.resolve(base_url=base_url, api_key=api_key))
        try:
            req = rq.import_template(reference, name, username=username, password=password, insecure=insecure)
            async with http.stream(req) as resp:
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    event = rq.build_event(line.encode())
                    await acall(on_event, event)
                    if event.get("type") == "done":
                        return TemplateInfo.from_json(event["template"])
        finally:
            await http.aclose()
        raise SandboxError("the import log ended without a result: the daemon stopped during the import")
