# Generated from _async_commands.py by scripts/gen_sync.py (unasync): edit _async_commands.py, then run `make sdk`.
"""Commands in a sandbox: ``sbx.commands`` (run, list, kill, connect; ``CommandHandle`` of a background
command), ``sbx.pty`` (terminals) and ``sbx.git`` (git run by a command).

Written once, for both flavours: ``scripts/gen_sync.py`` generates its sync twin (``_sync*.py``, unasync);
never edit the twin by hand.

``timeout=`` parameters are the command's or the sandbox's lifetime (E2B naming), not a deadline of the call
itself, hence the ASYNC109 exemptions.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, overload

import branchbox.sdk._requests as rq
from branchbox.sdk._concurrency import call
from branchbox.sdk._config import UNSET, _Unset
from branchbox.sdk._errors import NotFoundError
from branchbox.sdk._models import CommandResult, OutputCollector, ProcessInfo
from branchbox.sdk._pty import PtyHandle
from branchbox.sdk._sync_http import Timeout, _Owner
from branchbox.sdk._workspaces import clone_command

if TYPE_CHECKING:  # websockets itself is imported on first use, by ws()
    from websockets.sync.client import ClientConnection

OutputCallback = Callable[[str], object]  # (async flavour) may return an awaitable, which is awaited


class _Runner(_Owner, Protocol):
    """A sandbox object whose commands a handle or ``sbx.git`` uses."""

    @property
    def commands(self) -> Commands: ...


def _consume(
    ws: ClientConnection,
    *,
    binary: bool,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    max_output: int | None = None,
) -> CommandResult:
    from websockets.exceptions import ConnectionClosed  # noqa: PLC0415 - websockets only once one is used

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

    def __init__(self, sandbox: _Runner, pid: int) -> None:
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

    def __init__(self, sandbox: _Runner) -> None:
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


class Pty:
    """``sbx.pty``: interactive terminals."""

    def __init__(self, sandbox: _Owner) -> None:
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

    def __init__(self, sandbox: _Runner) -> None:
        self._sbx = sandbox

    def clone(
        self, url: str, path: str | None = None, *, branch: str | None = None, depth: int | None = None,
        token: str | None = None, cwd: str | None = None, timeout: float | None = 600,
    ) -> CommandResult:  # fmt: skip
        """``git clone`` inside the sandbox (it needs network access to the server). Raises on failure."""
        argv, env = clone_command(url, path, branch=branch, depth=depth, token=token)
        return self._sbx.commands.run(shlex.join(argv), envs=env, cwd=cwd, timeout=timeout)
