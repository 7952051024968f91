"""envd's ``process.Process`` service over the Manager's processes (``spawn``, ``attach``, ``list_processes``,
``kill_process``) and the agent's process handles: no second implementation of commands.

A process outlives its stream: when the client goes away, its handle is detached (the process keeps running) and
``Connect`` attaches again. The deadline of a ``Start`` (``Connect-Timeout-Ms``, the SDK's ``timeout=``) bounds the
process: the agent kills it then, and the stream ends with ``deadline_exceeded``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal as signals
import time
from collections.abc import AsyncIterator
from typing import Any

from branchbox.agentclient.client import OutputChunk, ProcessExit, ProcessHandle
from branchbox.e2b.connect import RpcError, from_branchbox
from branchbox.e2b.state import E2BState, resolve_path, run_as
from branchbox.errors import AgentDisconnectedError, BranchboxError, SandboxNotFoundError, TimeoutError_

KEEPALIVE_DEFAULT_S = 50.0
MAX_PTY = 1000
_SIGNALS = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, 9: 9, 15: 15, "9": 9, "15": 15}

Message = dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise RpcError("invalid_argument", f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise RpcError("invalid_argument", f"{what} is not valid base64 ({exc})") from exc


def _gone(sid: str, doing: str) -> RpcError:
    # "was not found" is what the SDK reads as: the sandbox is not running any more
    return RpcError("unavailable", f"The sandbox {sid} was not found: it was killed or paused while {doing}")


def _end_event(end: ProcessExit) -> Message:
    if end.signal:
        try:
            name = signals.Signals(end.signal).name[3:].lower()
        except ValueError:
            name = str(end.signal)
        status = "signal: " + {"kill": "killed", "term": "terminated"}.get(name, name)
        return {"event": {"end": {"exitCode": -1, "exited": False, "status": status}}}
    code = end.exit_code
    return {"event": {"end": {"exitCode": code, "exited": True, "status": f"exit status {code}"}}}


class ProcessService:
    def __init__(self, state: E2BState) -> None:
        self.state = state

    # -- streams ---------------------------------------------------------------------------------
    async def start(
        self, sid: str, req: Message, user: str | None, deadline: float | None, keepalive: float | None
    ) -> AsyncIterator[Message]:
        proc = req.get("process") or {}
        cmd = proc.get("cmd")
        args = proc.get("args") or []
        if not isinstance(cmd, str) or not cmd or not isinstance(args, list):
            raise RpcError("invalid_argument", "process.cmd (a string) is required; process.args is a list")
        envs = proc.get("envs") or {}
        cwd = proc.get("cwd")
        pty = self._pty(req.get("pty"))
        tag = req.get("tag") if isinstance(req.get("tag"), str) else None
        stdin = bool(req.get("stdin", False)) or pty is not None
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            handle = await self.state.manager.spawn(
                sid, [cmd, *map(str, args)], env=envs, cwd=resolve_path(cwd, user) if cwd else None,
                user=run_as(user), tag=tag, stdin=stdin, pty=pty, timeout=timeout,
            )  # fmt: skip
        except BranchboxError as exc:
            raise from_branchbox(exc) from exc
        async for msg in self._stream(sid, handle, deadline, keepalive, "the command ran", pty=pty is not None):
            yield msg

    async def connect(
        self, sid: str, req: Message, deadline: float | None, keepalive: float | None
    ) -> AsyncIterator[Message]:
        pid = await self._pid(sid, req.get("process"))
        procs = await self._call(self.state.manager.list_processes(sid))
        pty = any(p.pid == pid and p.pty for p in procs)
        handle = await self._call(self.state.manager.attach(sid, pid))
        async for msg in self._stream(
            sid, handle, deadline, keepalive, "connected to the command", pty=pty, kill=False
        ):
            yield msg

    async def _stream(
        self,
        sid: str,
        handle: ProcessHandle,
        deadline: float | None,
        keepalive: float | None,
        doing: str,
        *,
        pty: bool,
        kill: bool = True,
    ) -> AsyncIterator[Message]:
        key = (sid, handle.pid)
        self.state.handles[key] = handle
        nxt: asyncio.Future[OutputChunk | ProcessExit] | None = None
        ended = False
        try:
            yield {"event": {"start": {"pid": handle.pid}}}
            interval = keepalive or KEEPALIVE_DEFAULT_S
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(handle.__anext__())
                wait = interval if deadline is None else min(interval, deadline - time.monotonic())
                done, _ = await asyncio.wait({nxt}, timeout=max(0.0, wait))
                if not done:
                    if deadline is not None and time.monotonic() >= deadline:
                        if kill:
                            with contextlib.suppress(BranchboxError):
                                await self.state.manager.kill_process(sid, handle.pid, 9)
                        raise RpcError("deadline_exceeded", "the command's timeout passed: it was killed")
                    yield {"event": {"keepalive": {}}}
                    continue
                nxt = None
                try:
                    item = done.pop().result()
                except StopAsyncIteration:
                    ended = True
                    raise _gone(sid, doing) from None
                except TimeoutError_ as exc:
                    ended = True
                    raise RpcError("deadline_exceeded", exc.message) from exc
                except (AgentDisconnectedError, SandboxNotFoundError) as exc:
                    ended = True
                    raise _gone(sid, doing) from exc
                except BranchboxError as exc:
                    ended = True
                    raise from_branchbox(exc) from exc
                if isinstance(item, ProcessExit):
                    ended = True
                    if deadline is not None and time.monotonic() >= deadline and kill:
                        raise RpcError("deadline_exceeded", "the command's timeout passed: it was killed")
                    yield _end_event(item)
                    return
                field = "pty" if pty else item.stream
                yield {"event": {"data": {field: _b64(item.data)}}}
        finally:
            if self.state.handles.get(key) is handle:
                del self.state.handles[key]
            if nxt is not None:
                nxt.cancel()
            if not ended:  # the client went away: the process keeps running
                with contextlib.suppress(BranchboxError, asyncio.CancelledError):
                    await handle.detach()

    # -- unary -----------------------------------------------------------------------------------
    async def list(self, sid: str, req: Message) -> Message:
        procs = await self._call(self.state.manager.list_processes(sid))
        out = []
        for p in procs:
            if not p.running:
                continue
            info: Message = {"config": {"cmd": p.cmd[0] if p.cmd else "", "args": p.cmd[1:], "envs": {}}, "pid": p.pid}
            if p.tag is not None:
                info["tag"] = p.tag
            out.append(info)
        return {"processes": out}

    async def send_input(self, sid: str, req: Message) -> Message:
        pid = await self._pid(sid, req.get("process"))
        data = req.get("input") or {}
        payload = data.get("stdin", data.get("pty"))
        chunk = _unb64(payload if payload is not None else "", "input")
        await self._with_handle(sid, pid, lambda h: h.send_stdin(chunk))
        return {}

    async def stream_input(self, sid: str, messages: AsyncIterator[Message]) -> Message:
        """A client stream: ``start`` (the process), then ``data`` (input) and ``keepalive`` messages, in order."""
        pid: int | None = None
        async for m in messages:
            if "start" in m:
                pid = await self._pid(sid, (m["start"] or {}).get("process"))
            elif "data" in m:
                if pid is None:
                    raise RpcError("invalid_argument", "the input stream must begin with a start message")
                data = (m["data"] or {}).get("input") or {}
                payload = data.get("stdin", data.get("pty"))
                chunk = _unb64(payload if payload is not None else "", "input")
                await self._with_handle(sid, pid, lambda h, c=chunk: h.send_stdin(c))
        return {}

    async def close_stdin(self, sid: str, req: Message) -> Message:
        pid = await self._pid(sid, req.get("process"))
        await self._with_handle(sid, pid, lambda h: h.close_stdin())
        return {}

    async def update(self, sid: str, req: Message) -> Message:
        pid = await self._pid(sid, req.get("process"))
        size = self._pty(req.get("pty"))
        if size is not None:
            cols, rows = size
            await self._with_handle(sid, pid, lambda h: h.resize(cols, rows))
        return {}

    async def send_signal(self, sid: str, req: Message) -> Message:
        pid = await self._pid(sid, req.get("process"))
        sig = _SIGNALS.get(req.get("signal", "SIGNAL_SIGKILL"))
        if sig is None:
            raise RpcError("invalid_argument", "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        procs = await self._call(self.state.manager.list_processes(sid))
        if not any(p.pid == pid and p.running for p in procs):  # the agent keeps exited ones for attach
            raise RpcError("not_found", f"process {pid} is not running")
        await self._call(self.state.manager.kill_process(sid, pid, sig))
        return {}

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _pty(pty: Any) -> tuple[int, int] | None:
        if not isinstance(pty, dict):
            return None
        size = pty.get("size") or {}
        cols, rows = size.get("cols", 80), size.get("rows", 24)
        if not all(isinstance(v, int) and 0 < v <= MAX_PTY for v in (cols, rows)):
            raise RpcError("invalid_argument", f"pty.size cols and rows must be 1 to {MAX_PTY}")
        return cols, rows

    async def _pid(self, sid: str, selector: Any) -> int:
        if not isinstance(selector, dict):
            raise RpcError("invalid_argument", "process (a selector with pid or tag) is required")
        pid = selector.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            return pid
        tag = selector.get("tag")
        if isinstance(tag, str):
            for p in await self._call(self.state.manager.list_processes(sid)):
                if p.tag == tag and p.running:
                    return int(p.pid)
            raise RpcError("not_found", f"no running process has the tag {tag!r}")
        raise RpcError("invalid_argument", "process selector needs a pid (a positive integer) or a tag")

    async def _with_handle(self, sid: str, pid: int, op: Any) -> None:
        """Run ``op(handle)`` on the stream that holds the process, or on a short attach when no stream does."""
        handle = self.state.handles.get((sid, pid))
        if handle is not None:
            await self._call(op(handle))
            return
        handle = await self._call(self.state.manager.attach(sid, pid))
        try:
            await self._call(op(handle))
        finally:
            with contextlib.suppress(BranchboxError):
                await handle.detach()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except BranchboxError as exc:
            raise from_branchbox(exc) from exc
