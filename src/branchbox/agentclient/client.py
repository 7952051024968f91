"""Host-side asyncio client of the in-sandbox agent (protocol in :mod:`branchbox.agent.wire`).

One :class:`AgentClient` holds one connection; any number of calls run concurrently over it. A call is a
future, not a task: frames are parsed and dispatched from the protocol's ``data_received``. Errors the agent
returns become :mod:`branchbox.errors` classes by code; a dropped connection fails every pending call with
:class:`~branchbox.errors.AgentDisconnectedError`.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from branchbox.agent import wire
from branchbox.agentclient.calls import ACK_EVERY, Call, Connection, ExecCall, ListCall, StreamCall
from branchbox.agentclient.process import OutputChunk, ProcessExit, ProcessHandle
from branchbox.agentclient.watch import DirWatch
from branchbox.errors import (
    AgentDisconnectedError,
    AgentError,
    TimeoutError_,
)
from branchbox.models import ArchiveResult, ExecResult, FileEntry, ProcessInfo

__all__ = ["ACK_EVERY", "AgentClient", "OutputChunk", "ProcessExit", "ProcessHandle"]


def _entry(d: Mapping[str, Any]) -> FileEntry:
    return FileEntry(
        path=d["path"],
        name=d["name"],
        type=d["type"],
        size=d["size"],
        mode=d["mode"],
        mtime=d["mtime"],
        symlink_target=d.get("symlink_target"),
        uid=d.get("uid", 0),
        gid=d.get("gid", 0),
        owner=d.get("owner", ""),
        group=d.get("group", ""),
        xattrs=d.get("xattrs") or {},
    )


def _call_frame(channel: int, method: str, params: Mapping[str, Any]) -> bytes:
    return wire.encode_json(wire.CALL, channel, {"method": method, "params": params})


def _exec_params(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"cmd": cmd if isinstance(cmd, str) else list(cmd)}
    if env:
        params["env"] = dict(env)
    if cwd is not None:
        params["cwd"] = cwd
    if user is not None:
        params["user"] = user
    if timeout is not None:
        params["timeout"] = timeout
    return params


async def _vsock_connect(address: wire.VsockAddress) -> socket.socket:
    """A connected AF_VSOCK stream to ``address`` (OSError when nobody listens there yet)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


class AgentClient:
    """One connection to one agent. Create with :meth:`connect`; close with :meth:`aclose`."""

    def __init__(self, conn: Connection, hello: dict[str, Any]) -> None:
        self._conn = conn
        self.hello: dict[str, object] = hello

    @classmethod
    async def connect(
        cls, address: Path | wire.VsockAddress, *, timeout: float = 10.0, open_session: bool = False
    ) -> AgentClient:
        """Connect and wait for the agent's HELLO (the agent may still be starting).

        ``address``: a unix socket, or an AF_VSOCK address (a microVM on a host with vhost-vsock).
        ``open_session``: the stream may be a character device relayed by a VMM (virtio-serial), not an accepted
        connection: send HELLO first (with a nonce) and wait for the agent's HELLO echoing it."""
        loop = asyncio.get_running_loop()
        conn = Connection(loop)
        where = f"vsock {address}" if isinstance(address, wire.VsockAddress) else str(address)
        try:
            async with asyncio.timeout(timeout):
                if isinstance(address, wire.VsockAddress):
                    await loop.create_connection(lambda: conn, sock=await _vsock_connect(address))
                else:
                    with wire.short_unix_path(address) as path:
                        await loop.create_unix_connection(lambda: conn, path)
                if open_session:
                    conn.nonce = secrets.token_hex(8)
                    conn.write(wire.encode_json(wire.HELLO, 0, {"nonce": conn.nonce}))
                hello = await conn.hello
        except TimeoutError:
            if conn.transport is not None:
                conn.closing = True
                conn.transport.abort()
            raise TimeoutError_(
                f"no HELLO from the agent on {where} within {timeout} s: is the sandbox running?"
            ) from None
        except OSError as exc:
            raise AgentDisconnectedError(f"cannot connect to the agent on {where}: {exc}") from exc
        if hello.get("protocol") != wire.PROTOCOL_VERSION:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.close()
            raise AgentError(
                f"agent speaks protocol {hello.get('protocol')!r}, this client {wire.PROTOCOL_VERSION}: "
                "rebuild the sandbox with a matching agent"
            )
        return cls(conn, hello)

    @classmethod
    async def over_socket(cls, sock: socket.socket, *, timeout: float = 10.0) -> AgentClient:
        """A client on a connected unix stream socket (an agent warming itself up through a socket pair)."""
        loop = asyncio.get_running_loop()
        conn = Connection(loop)
        async with asyncio.timeout(timeout):
            await loop.create_unix_connection(lambda: conn, sock=sock)
            hello = await conn.hello
        return cls(conn, hello)

    @property
    def closed(self) -> bool:
        return self._conn.transport is None

    async def wait_closed(self) -> None:
        await asyncio.shield(self._conn.lost)

    @property
    def open_calls(self) -> int:
        """Calls and streams waiting on the agent (liveness checks run while there are any)."""
        return len(self._conn.calls)

    async def aclose(self) -> None:
        conn = self._conn
        if conn.transport is not None:
            conn.closing = True
            conn.transport.close()
        await asyncio.shield(conn.lost)

    def abort(self) -> None:
        """Drop the connection now, unsent data too (``aclose`` waits for it, which a stopped agent never takes):
        every open call and stream fails with AgentDisconnectedError."""
        conn = self._conn
        if conn.transport is not None:
            conn.closing = True
            conn.transport.abort()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- plumbing ------------------------------------------------------------------------------------
    async def _wait(self, call: Call) -> Any:
        try:
            return await call.future
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def _request(self, method: str, params: Mapping[str, Any]) -> Any:
        call = Call(self._conn)
        self._conn.write(_call_frame(call.channel, method, params))
        return await self._wait(call)

    # -- calls ---------------------------------------------------------------------------------------
    async def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        await self._request("ping", {})
        return time.perf_counter() - start

    async def configure(
        self, *, env: Mapping[str, str] | None = None, workdir: str | None = None, user: str | None = None
    ) -> None:
        """Set the base environment (boot env + ``env``), default working directory and default user."""
        params: dict[str, Any] = {"env": dict(env or {})}
        if workdir is not None:
            params["workdir"] = workdir
        if user is not None:
            params["user"] = user
        await self._request("configure", params)

    async def identity(
        self,
        *,
        hostname: str | None = None,
        machine_id: str | None = None,
        entropy: bytes | None = None,
        clock: float | None = None,
    ) -> dict[str, Any]:
        """Make a cloned sandbox unique: hostname, /etc/machine-id, RNG reseed with ``entropy``, wall clock."""
        params: dict[str, Any] = {}
        if hostname is not None:
            params["hostname"] = hostname
        if machine_id is not None:
            params["machine_id"] = machine_id
        if entropy is not None:
            params["entropy"] = entropy.hex()
        if clock is not None:
            params["time"] = clock
        return cast(dict[str, Any], await self._request("identity", params))

    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command to completion; a str runs in a shell (or directly when simple). ``max_output``: keep at
        most this many bytes of each stream in the result (the rest is drained and dropped; the result says
        ``stdout_truncated`` / ``stderr_truncated``); None keeps everything."""
        conn = self._conn
        call = ExecCall(conn, on_stdout, on_stderr, max_output)
        params = _exec_params(cmd, env, cwd, user, timeout)
        start = time.perf_counter()
        frame = _call_frame(call.channel, "exec", params)
        rest = b""
        if stdin is not None:
            params["stdin"] = True
            frame = _call_frame(call.channel, "exec", params)
            if len(stdin) <= min(call.credit, wire.CHUNK_SIZE):
                call.credit -= len(stdin)
                if stdin:
                    frame += wire.encode_data(call.channel, wire.STDIN, stdin)
                frame += wire.encode_eof(call.channel, wire.STDIN)
            else:
                rest = stdin
        conn.write(frame)
        try:
            if rest:
                await call.send_stream(wire.STDIN, rest)
                if not call.done:
                    conn.write(wire.encode_eof(call.channel, wire.STDIN))
            result = await call.future
        except asyncio.CancelledError:
            call.cancel()
            raise
        return ExecResult(
            exit_code=int(result["exit_code"]),
            stdout=b"".join(call.stdout),
            stderr=b"".join(call.stderr),
            signal=result.get("signal"),
            duration_ms=(time.perf_counter() - start) * 1000.0,
            stdout_truncated=call.truncated[wire.STDOUT],
            stderr_truncated=call.truncated[wire.STDERR],
        )

    async def spawn(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        timeout: float | None = None,
    ) -> ProcessHandle:
        """Start a background process and stream its output from the start. ``pty`` is (cols, rows)."""
        params = _exec_params(cmd, env, cwd, user, timeout)
        params.update(background=True, attach=True, stdin=stdin)
        if tag is not None:
            params["tag"] = tag
        if pty is not None:
            params["pty"] = [pty[0], pty[1]]
        return await self._open_stream("exec", params)

    async def attach(self, pid: int) -> ProcessHandle:
        """Stream a running (or exited) process: its recent output tail, then live output and exit."""
        return await self._open_stream("processes.attach", {"pid": pid})

    async def _open_stream(self, method: str, params: Mapping[str, Any]) -> ProcessHandle:
        call = StreamCall(self._conn)
        self._conn.write(_call_frame(call.channel, method, params))
        try:
            event = await call.started
        except asyncio.CancelledError:
            call.cancel()
            raise
        return ProcessHandle(self._request, call, int(event["pid"]))

    async def list_processes(self) -> list[ProcessInfo]:
        result = await self._request("processes.list", {})
        return [
            ProcessInfo(
                pid=p["pid"],
                cmd=list(p["cmd"]),
                tag=p.get("tag"),
                running=bool(p["running"]),
                exit_code=p.get("exit_code"),
                pty=bool(p.get("pty")),
            )
            for p in result["processes"]
        ]

    async def kill(self, pid: int, signal: int = 9) -> None:
        """Send ``signal`` to the process group of ``pid``."""
        await self._request("processes.kill", {"pid": pid, "signal": signal})

    # -- files ---------------------------------------------------------------------------------------
    async def read_file(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.download(path)])

    def download(self, path: str, *, max_size: int | None = None) -> AsyncIterator[bytes]:
        """Stream a file in chunks of at most 256 KiB; memory stays bounded by the flow-control window. A file
        larger than ``max_size`` fails with PayloadTooLargeError before any byte is sent."""
        return self._stream_out("files.read", path, {"max_size": max_size} if max_size is not None else {})

    def download_archive(self, path: str) -> AsyncIterator[bytes]:
        """Stream a tar of ``path``: a directory's contents relative to it, or one file under its own name."""
        return self._stream_out("files.archive", path)

    async def _stream_out(self, method: str, path: str, extra: Mapping[str, Any] | None = None) -> AsyncIterator[bytes]:
        call = StreamCall(self._conn)
        self._conn.write(_call_frame(call.channel, method, {"path": path, **(extra or {})}))
        try:
            while True:
                item = await call.next_chunk()
                if item is None:
                    return
                yield item[1]
        finally:
            if not call.future.done():
                call.cancel()

    async def write_file(self, path: str, data: bytes, *, mode: int | None = None) -> FileEntry:
        """Atomically replace ``path`` (parent directories are created)."""
        if len(data) > wire.CHUNK_SIZE:
            return await self.upload(path, _one(data), mode=mode)
        call = Call(self._conn)
        frames = _call_frame(call.channel, "files.write", _write_params(path, mode))
        if data:
            frames += wire.encode_data(call.channel, wire.STDIN, data)
        self._conn.write(frames + wire.encode_eof(call.channel, wire.STDIN))
        return _entry(await self._wait(call))

    async def upload(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int | None = None,
        owner: str | None = None,
        xattrs: Mapping[str, str] | None = None,
    ) -> FileEntry:
        """Stream ``chunks`` into ``path`` atomically, holding at most one window in flight. ``xattrs``: extended
        attributes (``user.*``) the file gets."""
        params = _write_params(path, mode, owner)
        if xattrs:
            params["xattrs"] = dict(xattrs)
        return _entry(await self._stream_in("files.write", params, chunks))

    async def upload_archive(self, path: str, chunks: AsyncIterable[bytes]) -> ArchiveResult:
        """Unpack a tar stream into the directory ``path`` (created with its parents) as it is sent."""
        return ArchiveResult(**(await self._stream_in("files.extract", {"path": path}, chunks)))

    async def _stream_in(self, method: str, params: dict[str, Any], chunks: AsyncIterable[bytes]) -> dict[str, Any]:
        conn = self._conn
        call = Call(conn)
        conn.write(_call_frame(call.channel, method, params))
        try:
            async for chunk in chunks:
                if call.done:
                    break
                await call.send_stream(wire.STDIN, chunk)
            if not call.done:
                conn.write(wire.encode_eof(call.channel, wire.STDIN))
            return cast(dict[str, Any], await call.future)
        except BaseException:
            if not call.future.done():
                call.cancel()
            raise

    async def list_dir(self, path: str, *, depth: int = 1, xattrs: str | None = None) -> list[FileEntry]:
        """Entries under ``path``; ``xattrs``: also their extended attributes whose names start with it."""
        call = ListCall(self._conn)
        params: dict[str, Any] = {"path": path, "depth": depth}
        if xattrs is not None:
            params["xattrs"] = xattrs
        self._conn.write(_call_frame(call.channel, "files.list", params))
        result = await self._wait(call)
        return [_entry(e) for e in [*call.entries, *result["entries"]]]

    async def stat(self, path: str, *, xattrs: str | None = None) -> FileEntry:
        return _entry(await self._request("files.stat", {"path": path} if xattrs is None else
                                          {"path": path, "xattrs": xattrs}))  # fmt: skip

    async def mkdir(self, path: str) -> FileEntry:
        """Create a directory and its parents (no error when it exists)."""
        return _entry(await self._request("files.mkdir", {"path": path, "parents": True}))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._request("files.remove", {"path": path, "recursive": recursive})

    async def rename(self, src: str, dst: str) -> FileEntry:
        return _entry(await self._request("files.rename", {"src": src, "dst": dst}))

    async def watch(self, path: str, *, recursive: bool = False) -> DirWatch:
        """Watch a directory (inotify in the sandbox; ``recursive``: its subdirectories too, new ones as they
        appear): returns once the watches are in place; iterate the handle for the events, ``aclose`` it to stop."""
        call = StreamCall(self._conn)
        self._conn.write(_call_frame(call.channel, "files.watch", {"path": path, "recursive": recursive}))
        try:
            await call.started
        except asyncio.CancelledError:
            call.cancel()
            raise
        return DirWatch(call, path)


def _write_params(path: str, mode: int | None, owner: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"path": path}
    if mode is not None:
        params["mode"] = mode
    if owner is not None:
        params["owner"] = owner
    return params


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
