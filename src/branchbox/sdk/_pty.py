"""Interactive terminals' handles, one hand-written pair: ``AsyncPtyHandle`` reads the WebSocket in a task of
the event loop, ``PtyHandle`` in a thread of its own (output reaches ``on_data`` while the caller types). The
rest of ``sbx.pty`` is generated with the SDK (``scripts/gen_sync.py``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import branchbox.sdk._requests as rq
from branchbox.sdk._concurrency import acall
from branchbox.sdk._errors import TimeoutException
from branchbox.sdk._models import CommandResult

if TYPE_CHECKING:  # websockets is imported once a terminal is opened (sdk/_async_http.py)
    from websockets.asyncio.client import ClientConnection as AsyncConnection
    from websockets.sync.client import ClientConnection as SyncConnection


class AsyncPtyHandle:
    """An interactive terminal. Output goes to ``on_data`` (bytes; may be async) or is collected."""

    def __init__(self, ws: AsyncConnection, on_data: Callable[[bytes], object] | None) -> None:
        self._ws = ws
        self._on_data = on_data
        self._collected = bytearray()
        self._started = asyncio.get_running_loop().create_future()
        self.pid = 0
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> CommandResult:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        try:
            return await self._loop()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            err = rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "")
            if not self._started.done():
                self._started.set_exception(err)
            raise err from exc
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    async def _loop(self) -> CommandResult:
        t0 = time.perf_counter()
        async for raw in self._ws:
            ev = rq.parse_event(raw, binary=True)
            if ev.kind == "started":
                self.pid = ev.pid
                self._started.set_result(ev.pid)
            elif ev.kind in ("stdout", "stderr"):
                if self._on_data is not None:
                    await acall(self._on_data, ev.data)
                else:
                    self._collected += ev.data
            elif ev.kind == "exit":
                out = self._collected.decode("utf-8", "replace")
                return CommandResult(ev.exit_code, out, "", ev.signal, (time.perf_counter() - t0) * 1000)
            elif ev.error is not None:
                raise ev.error
        raise rq.ws_close_error(self._ws.close_code, self._ws.close_reason or "")

    async def wait_started(self, timeout: float | None = 30.0) -> int:
        """The shell's pid once it started (0 if it had not within ``timeout`` s); raises what stopped it."""
        try:
            return int(await asyncio.wait_for(asyncio.shield(self._started), timeout))
        except TimeoutError:
            return self.pid

    async def send_input(self, data: str | bytes) -> None:
        await self._ws.send(rq.stdin_frame(data, binary=True))

    async def resize(self, cols: int, rows: int) -> None:
        await self._ws.send(rq.resize_frame(cols, rows))

    async def kill(self, signal: int = 9) -> None:
        await self._ws.send(rq.kill_frame(signal))

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Until the shell exits (TimeoutException after ``timeout`` s, the terminal left open); the result's
        stdout holds the output when no on_data was given."""
        try:
            result = await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError as exc:
            if not self._task.done():
                raise TimeoutException(f"the pty did not exit within {timeout} s", code="timeout") from exc
            await self._ws.close()
            raise
        except BaseException:
            await self._ws.close()
            raise
        await self._ws.close()
        return result

    async def close(self) -> None:
        """Disconnect (the daemon kills the shell)."""
        await self._ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class PtyHandle:
    """An interactive terminal. Output goes to ``on_data`` (bytes) from a reader thread, or is collected."""

    def __init__(self, ws: SyncConnection, on_data: Callable[[bytes], object] | None) -> None:
        self._ws = ws
        self._on_data = on_data
        self._collected = bytearray()
        self._result: CommandResult | None = None
        self._error: BaseException | None = None
        self._pid = threading.Event()
        self.pid = 0
        self._thread = threading.Thread(target=self._read, name="branchbox-pty", daemon=True)
        self._thread.start()

    def _started(self, pid: int) -> None:
        self.pid = pid
        self._pid.set()

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        try:
            t0 = time.perf_counter()
            for raw in self._ws:
                ev = rq.parse_event(raw, binary=True)
                if ev.kind == "started":
                    self._started(ev.pid)
                elif ev.kind in ("stdout", "stderr"):
                    if self._on_data is not None:
                        self._on_data(ev.data)
                    else:
                        self._collected += ev.data
                elif ev.kind == "exit":
                    out = self._collected.decode("utf-8", "replace")
                    dur = (time.perf_counter() - t0) * 1000
                    self._result = CommandResult(ev.exit_code, out, "", ev.signal, dur)
                    return
                elif ev.error is not None:
                    self._error = ev.error
                    return
            self._error = rq.ws_close_error(self._ws.close_code, self._ws.close_reason or "")
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            self._error = rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "")
        except BaseException as exc:  # delivered to wait()
            self._error = exc
        finally:
            self._pid.set()

    def wait_started(self, timeout: float | None = 30.0) -> int:
        """The shell's pid once it started (0 if it had not within ``timeout`` s); raises what stopped it."""
        self._pid.wait(timeout)
        if self._error is not None and not self.pid:
            raise self._error
        return self.pid

    def send_input(self, data: str | bytes) -> None:
        self._ws.send(rq.stdin_frame(data, binary=True))

    def resize(self, cols: int, rows: int) -> None:
        self._ws.send(rq.resize_frame(cols, rows))

    def kill(self, signal: int = 9) -> None:
        self._ws.send(rq.kill_frame(signal))

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Until the shell exits (TimeoutException after ``timeout`` s, the terminal left open); the result's
        stdout holds the output when no on_data was given."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutException(f"the pty did not exit within {timeout} s", code="timeout")
        self._ws.close()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Disconnect (the daemon kills the shell)."""
        self._ws.close()
        self._thread.join(5)
