"""Operations inside a running sandbox, passed through to its agent: commands (exec, spawn, attach, processes) and
files (read, write, stream, archive, list, stat, mkdir, remove, rename). A lost connection is told apart from a
dead init, and a stopped agent is found by the watchdog of ``core/liveness.py`` while calls are open."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from branchbox.agentclient.client import ProcessHandle
from branchbox.agentclient.watch import DirWatch
from branchbox.core import validate
from branchbox.core.events import ManagerEvent
from branchbox.core.liveness import Watchdog, is_stopped
from branchbox.core.runtime import Live, Runtime
from branchbox.errors import AgentDisconnectedError, BranchboxError, InvalidStateError
from branchbox.models import ArchiveResult, ExecResult, FileEntry, ProcessInfo, SandboxState

log = logging.getLogger("branchbox.manager")
OutputCallback = Callable[[bytes], object]
_T = TypeVar("_T")
EXIT_GRACE_S = 2.0  # a lost agent connection waits this long for the init's exit before it is called a disconnect


class SandboxCalls:
    """``wake``: resumes a paused sandbox (the lifecycle's resume), for those created with ``auto_resume``."""

    def __init__(self, rt: Runtime, wake: Callable[[str], Awaitable[object]] | None = None) -> None:
        self.rt = rt
        self._wake = wake
        self.liveness = Watchdog(self._check_agents)  # runs while agent calls are open (core/liveness.py)

    def _running(self, sandbox_id: str) -> Live:
        return self.rt.require(sandbox_id, SandboxState.RUNNING)

    async def _live(self, sandbox_id: str) -> Live:
        """The running sandbox; a paused one created with ``auto_resume`` is resumed for the call first."""
        live = self.rt.live.get(sandbox_id)
        if (
            live is not None
            and live.info.state is SandboxState.PAUSED
            and live.info.lifecycle.auto_resume
            and self._wake is not None
        ):
            with contextlib.suppress(InvalidStateError):  # destroyed meanwhile: the check below says so
                await self._wake(sandbox_id)
        return self._running(sandbox_id)

    async def awake(self, sandbox_id: str) -> None:
        """Resume the sandbox if it is paused and was created with ``auto_resume`` (what every call here does
        first; for callers that reach it otherwise: a download's first check, the port proxy). Raises as a call
        would when it is not running then."""
        await self._live(sandbox_id)

    async def exec(
        self,
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command to its exit. The result keeps at most ``max_output`` bytes of each stream (never more
        than the ``max_output_bytes`` setting); the rest is drained, given to the callbacks and dropped, and the
        result says ``stdout_truncated`` / ``stderr_truncated``."""
        live = await self._live(sandbox_id)
        validate.command(cmd)
        validate.stdin(stdin)
        env_ = validate.env(env)
        limit = self.rt.settings.max_output_bytes
        if max_output is not None:
            limit = min(limit, max(0, max_output))
        t0 = time.perf_counter()
        outcome = "error"
        try:
            res = await self._agent_call(
                live,
                live.agent.exec(
                    cmd, env=env_, cwd=cwd, user=user, stdin=stdin, timeout=timeout,
                    on_stdout=on_stdout, on_stderr=on_stderr, max_output=limit,
                ),
            )  # fmt: skip
            outcome = "ok"
            return res
        finally:
            self.rt.emit(ManagerEvent("exec", sandbox_id, live.info.backend, outcome=outcome,
                                      seconds=time.perf_counter() - t0))  # fmt: skip

    async def spawn(
        self,
        sandbox_id: str,
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
        live = await self._live(sandbox_id)
        validate.command(cmd)
        env_ = validate.env(env)
        return await self._agent_call(
            live, live.agent.spawn(cmd, env=env_, cwd=cwd, user=user, tag=tag, stdin=stdin, pty=pty, timeout=timeout)
        )

    async def attach(self, sandbox_id: str, pid: int) -> ProcessHandle:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.attach(pid))

    async def list_processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.list_processes())

    async def kill_process(self, sandbox_id: str, pid: int, signal: int = 9) -> None:
        live = await self._live(sandbox_id)
        await self._agent_call(live, live.agent.kill(pid, signal))

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.read_file(path))

    def download(self, sandbox_id: str, path: str, *, max_size: int | None = None) -> AsyncIterator[bytes]:
        """Stream a file out of the sandbox in chunks (bounded memory); a file over ``max_size`` bytes fails with
        PayloadTooLargeError before any byte."""
        live = self._running(sandbox_id)
        return self._stream_out(live, live.agent.download(path, max_size=max_size))

    def download_archive(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        """Stream a tar of a sandbox path: a directory's contents (names relative to it), or one file."""
        live = self._running(sandbox_id)
        return self._stream_out(live, live.agent.download_archive(path))

    async def write_file(self, sandbox_id: str, path: str, data: bytes, *, mode: int | None = None) -> FileEntry:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.write_file(path, data, mode=mode))

    async def upload(
        self,
        sandbox_id: str,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int | None = None,
        owner: str | None = None,
        xattrs: Mapping[str, str] | None = None,
    ) -> FileEntry:
        """Stream a file into the sandbox (temp file, then renamed into place). ``owner`` (a user of the sandbox):
        a new file and the parent directories the write creates are that user's, not root's. ``xattrs``: extended
        attributes (``user.*`` names) the file gets; a replaced file's ``user.*`` attributes are kept."""
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.upload(path, chunks, mode=mode, owner=owner, xattrs=xattrs))

    async def upload_archive(self, sandbox_id: str, path: str, chunks: AsyncIterable[bytes]) -> ArchiveResult:
        """Unpack a tar stream into the sandbox directory ``path`` (created with its parents)."""
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.upload_archive(path, chunks))

    async def list_files(
        self, sandbox_id: str, path: str, *, depth: int = 1, xattrs: str | None = None
    ) -> builtins.list[FileEntry]:
        """Entries under ``path``; ``xattrs`` (a ``user.*`` name prefix): with those extended attributes."""
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.list_dir(path, depth=depth, xattrs=xattrs))

    async def stat(self, sandbox_id: str, path: str, *, xattrs: str | None = None) -> FileEntry:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.stat(path, xattrs=xattrs))

    async def mkdir(self, sandbox_id: str, path: str) -> FileEntry:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.mkdir(path))

    async def remove(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        live = await self._live(sandbox_id)
        await self._agent_call(live, live.agent.remove(path, recursive=recursive))

    async def rename(self, sandbox_id: str, src: str, dst: str) -> FileEntry:
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.rename(src, dst))

    async def watch_dir(self, sandbox_id: str, path: str, *, recursive: bool = False) -> DirWatch:
        """Watch a sandbox directory (inotify, by its agent): the handle yields FileEvents as they happen until
        the directory is removed or the handle is closed (``aclose``, which removes the watches)."""
        live = await self._live(sandbox_id)
        return await self._agent_call(live, live.agent.watch(path, recursive=recursive))

    def open_agent_calls(self) -> int:
        """Calls and streams open on the agents of live sandboxes (0 when nothing waits on any agent)."""
        return sum(live.agent.open_calls for live in self.rt.live.values())

    # ------------------------------------------------------------------ failures of the agent
    async def _stream_out(self, live: Live, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.liveness.kick()
        try:
            async for chunk in chunks:
                yield chunk
        except AgentDisconnectedError as exc:
            raise await self._disconnected(live) from exc

    async def _agent_call(self, live: Live, coro: Awaitable[_T]) -> _T:
        self.liveness.kick()
        try:
            return await coro
        except AgentDisconnectedError as exc:
            raise await self._disconnected(live) from exc
        except BranchboxError as exc:
            self.rt.emit(ManagerEvent("error", live.info.id, code=exc.code, operation="agent"))
            raise

    async def _disconnected(self, live: Live) -> BranchboxError:
        if live.info.state is SandboxState.ERROR:
            return InvalidStateError(f"sandbox {live.info.id} is in error: {live.info.error}", state="error")
        try:  # the kernel closes a dying init's socket before it is gone: give its exit a moment to show
            async with asyncio.timeout(EXIT_GRACE_S):
                await live.backend.wait_exit(live.handle)
        except TimeoutError:
            return AgentDisconnectedError(f"lost the connection to the agent of sandbox {live.info.id}")
        return InvalidStateError(f"sandbox {live.info.id} has stopped: its init process exited", state="error")

    def _check_agents(self) -> bool:
        """The liveness check (core/liveness.py): a running sandbox with calls open on a stopped agent is marked
        error and its connection dropped, which fails those calls and streams at once. True while calls are open."""
        busy = False
        for live in list(self.rt.live.values()):
            if live.destroying or live.info.state is not SandboxState.RUNNING or not live.agent.open_calls:
                continue
            busy = True
            if is_stopped(live.handle.pid):
                why = (f"its agent (host pid {live.handle.pid}) is stopped (SIGSTOP or a debugger) and answers "
                       "nothing; destroy the sandbox")  # fmt: skip
                log.warning("sandbox %s: %s", live.info.id, why, extra={"sandbox_id": live.info.id})
                self.rt.set_state(live, SandboxState.ERROR, why)
                live.agent.abort()
        return busy
