"""WebSocket endpoints: streaming command runs, re-attach to a process, interactive PTY, directory watches.

Every message is a JSON text frame (protocol in docs/api.md). Server -> client: ``started {pid}``,
``stdout``/``stderr {data}``, ``exit {exit_code, signal}``, ``error {error: {code, message}}``.
Client -> server: ``stdin {data}``, ``close_stdin``, ``resize {cols, rows}``, ``kill {signal}``.
``?encoding=base64`` makes ``data`` base64 both ways; the default ``text`` decodes output as UTF-8 with
errors="replace" (incrementally, so characters split across chunks survive). Errors close the socket with
code 4000 + the HTTP status of the error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import structlog
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from branchbox.agent import wire
from branchbox.agentclient.client import OutputChunk, ProcessHandle
from branchbox.api.context import get_ctx
from branchbox.api.schemas import ClientFrame, PtyStart, StreamStart
from branchbox.errors import BadRequestError, BranchboxError

router = APIRouter(tags=["streams"])

Encoding = Annotated[Literal["text", "base64"], Query()]


def _error_frame(exc: BranchboxError) -> dict[str, Any]:
    return {"type": "error", "error": exc.to_dict()}


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], raw: Any) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise BadRequestError(f"invalid {model.__name__} message: {where}: {first['msg']}") from exc


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequestError("WebSocket messages must be JSON text frames (see docs/api.md)") from exc


async def _guarded(ws: WebSocket, body: Callable[[], Awaitable[None]]) -> None:
    """Accept, check the API key, run ``body``; turn errors into an error frame and a 4xxx close."""
    await ws.accept()
    ctx = get_ctx(ws)
    try:
        ctx.checker.check(ws.headers.get("authorization"))
        await body()
    except WebSocketDisconnect:
        return
    except BranchboxError as exc:
        ctx.metrics.count_api_error(exc.code)
        with contextlib.suppress(Exception):
            await ws.send_json(_error_frame(exc))
            await ws.close(code=4000 + exc.http_status, reason=exc.code)
        return
    except Exception as exc:
        ctx.log.exception("stream.failed")
        await _guarded_fail(ws, exc)
        return
    with contextlib.suppress(Exception):
        await ws.close(code=1000)


async def _guarded_fail(ws: WebSocket, exc: Exception) -> None:
    err = BranchboxError(f"internal error ({type(exc).__name__}); see the daemon log")
    with contextlib.suppress(Exception):
        await ws.send_json(_error_frame(err))
        await ws.close(code=4500, reason=err.code)


async def _session(ws: WebSocket, handle: ProcessHandle, encoding: str, *, kill_on_disconnect: bool) -> None:
    """Pump output to the client and client messages to the process until it exits or the client leaves."""
    log = structlog.get_logger("branchbox.api").bind(pid=handle.pid)
    await ws.send_json({"type": "started", "pid": handle.pid})
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}

    def encode(stream: str, data: bytes, final: bool = False) -> str:
        if encoding == "base64":
            return base64.b64encode(data).decode("ascii")
        return decoders[stream].decode(data, final)

    async def pump() -> None:
        exit_code, signal = -1, None
        async for item in handle:
            if isinstance(item, OutputChunk):
                text = encode(item.stream, item.data)
                if text:
                    await ws.send_json({"type": item.stream, "data": text})
            else:
                exit_code, signal = item.exit_code, item.signal
        if encoding == "text":
            for stream in ("stdout", "stderr"):
                tail = encode(stream, b"", final=True)
                if tail:
                    await ws.send_json({"type": stream, "data": tail})
        await ws.send_json({"type": "exit", "exit_code": exit_code, "signal": signal})

    async def read() -> None:
        while True:
            raw = await ws.receive_text()
            try:
                frame = _parse(ClientFrame, _loads(raw))
                await _apply(handle, frame, encoding)
            except BranchboxError as exc:  # a bad message is reported; the session goes on
                await ws.send_json(_error_frame(exc))

    pump_task = asyncio.create_task(pump())
    read_task = asyncio.create_task(read())
    try:
        done, _ = await asyncio.wait({pump_task, read_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump_task, read_task):
            task.cancel()
        await asyncio.gather(pump_task, read_task, return_exceptions=True)
    if pump_task in done and not isinstance(pump_task.exception(), WebSocketDisconnect):
        pump_task.result()  # re-raise a failure of the agent (becomes an error frame)
        return
    # the client left: noticed by a read, or by a send (a client that stopped reading, then closed)
    exc = read_task.exception() if read_task in done else None
    if kill_on_disconnect:
        log.info("stream.client_left", action="kill")
        with contextlib.suppress(BranchboxError):
            await handle.kill(9)
    else:
        log.info("stream.client_left", action="detach")
    await handle.detach()
    if exc is not None and not isinstance(exc, WebSocketDisconnect):
        raise exc


async def _apply(handle: ProcessHandle, frame: ClientFrame, encoding: str) -> None:
    if frame.type == "stdin":
        data = frame.data or ""
        if encoding == "base64":
            try:
                payload = base64.b64decode(data, validate=True)
            except binascii.Error as exc:
                raise BadRequestError(
                    "stdin data is not valid base64 (the socket was opened with encoding=base64)"
                ) from exc
        else:
            payload = data.encode("utf-8")
        await handle.send_stdin(payload)
    elif frame.type == "close_stdin":
        await handle.close_stdin()
    elif frame.type == "resize":
        if frame.cols is None or frame.rows is None:
            raise BadRequestError("resize needs both cols and rows")
        await handle.resize(frame.cols, frame.rows)
    else:
        await handle.kill(frame.signal or 9)


async def _not_runnable(ws: WebSocket, exc: BranchboxError, encoding: str) -> bool:
    """Answer a run whose program cannot be executed (the agent names it in ``program``) as a foreground run
    answers it: a stderr line and exit 127 or 126, no "started" (there is no process). False for other errors."""
    program = exc.details.get("program")
    if not isinstance(program, str):
        return False
    exit_code, line = wire.not_runnable(program, exc.details.get("errno"))
    data = base64.b64encode(line).decode("ascii") if encoding == "base64" else line.decode()
    await ws.send_json({"type": "stderr", "data": data})
    await ws.send_json({"type": "exit", "exit_code": exit_code, "signal": None})
    return True


@router.websocket("/v1/sandboxes/{sandbox_id}/commands/stream")
async def stream_command(ws: WebSocket, sandbox_id: str, encoding: Encoding = "text") -> None:
    async def body() -> None:
        structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
        start = _parse(StreamStart, _loads(await ws.receive_text()))
        try:
            handle = await get_ctx(ws).manager.spawn(
                sandbox_id,
                start.cmd,
                env=start.envs,
                cwd=start.cwd,
                user=start.user,
                tag=start.tag,
                stdin=start.stdin,
                timeout=start.timeout,
            )
        except BranchboxError as exc:
            if await _not_runnable(ws, exc, encoding):
                return
            raise
        await _session(ws, handle, encoding, kill_on_disconnect=start.kill_on_disconnect)

    await _guarded(ws, body)


@router.websocket("/v1/sandboxes/{sandbox_id}/commands/{pid}/attach")
async def attach_command(ws: WebSocket, sandbox_id: str, pid: int, encoding: Encoding = "text") -> None:
    async def body() -> None:
        structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
        handle = await get_ctx(ws).manager.attach(sandbox_id, pid)
        await _session(ws, handle, encoding, kill_on_disconnect=False)

    await _guarded(ws, body)


# a PTY's default command: bash where the image has it, else its POSIX shell (busybox, alpine)
LOGIN_SHELL = "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l"


@router.websocket("/v1/sandboxes/{sandbox_id}/pty")
async def pty(ws: WebSocket, sandbox_id: str, encoding: Encoding = "text") -> None:
    async def body() -> None:
        structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
        start = _parse(PtyStart, _loads(await ws.receive_text()))
        env = {"TERM": "xterm-256color", **(start.envs or {})}
        handle = await get_ctx(ws).manager.spawn(
            sandbox_id,
            start.cmd if start.cmd is not None else LOGIN_SHELL,
            env=env,
            cwd=start.cwd,
            user=start.user,
            tag=start.tag,
            stdin=True,
            pty=(start.cols, start.rows),
            timeout=start.timeout,
        )
        await _session(ws, handle, encoding, kill_on_disconnect=start.kill_on_disconnect)

    await _guarded(ws, body)


@router.websocket("/v1/sandboxes/{sandbox_id}/files/watch")
async def watch_files(ws: WebSocket, sandbox_id: str, path: str = "", recursive: bool = False) -> None:
    """A directory's changes (the agent's inotify watch): ``started`` once the watches are in place, then one
    message per event (``create``/``write``/``remove``/``rename``/``chmod`` with ``name`` relative to ``path`` and
    ``is_dir``; ``overflow`` with ``reason`` when events were lost), ``end`` when the directory is removed. The
    client closing the socket stops the watch."""

    async def body() -> None:
        structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
        handle = await get_ctx(ws).manager.watch_dir(sandbox_id, path, recursive=recursive)
        try:
            await ws.send_json({"type": "started", "path": path})

            async def pump() -> None:
                async for e in handle:
                    if e.type == "overflow":
                        await ws.send_json({"type": "overflow", "reason": e.reason})
                    else:
                        await ws.send_json({"type": e.type, "name": e.name, "is_dir": e.is_dir})
                await ws.send_json({"type": "end", "reason": handle.ended or "removed"})

            async def read() -> None:
                while True:  # nothing is expected from the client: its close ends the watch
                    await ws.receive_text()

            tasks = {asyncio.create_task(pump()), asyncio.create_task(read())}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                task.result()  # the agent's failure becomes an error frame; the client's close ends quietly
        finally:
            await handle.aclose()

    await _guarded(ws, body)
