"""The daemon's HTTP/1.1 protocol: uvicorn's httptools protocol, with the hot routes answered without ASGI.

uvicorn turns every request into an ASGI call: a scope, a task running the app through its middlewares, a
``receive`` that awaits the body, and two ``send`` messages that it checks and writes as two writes. For the three
routes that carry most traffic (:func:`branchbox.api.fastpath.match`) this protocol keeps uvicorn's parsing,
keep-alive, pipelining and shutdown handling, but instead of starting the app it waits for the whole body, calls
:meth:`FastPath.answer` in a task of its own and writes the status line, headers and body in one write.

Anything :meth:`FastPath.answer` declines (not JSON, a body that fails validation, ``background=true``), a body
above uvicorn's read buffer limit, and every other request run as uvicorn runs them: as ASGI, through the app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from branchbox.api.fastpath import Answer, FastPath, Hot, error_json, match

_log = logging.getLogger("branchbox.daemon")
_JSON = b"content-type: application/json\r\ncontent-length: "


class FrontProtocol(HttpToolsProtocol):
    """One connection. A hot request's cycle is created as uvicorn creates it, but not started as ASGI: it is
    held until its body is complete, then answered by :meth:`_answer`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        fast = getattr(config.app, "fast", None)
        self.fast: FastPath | None = fast if isinstance(fast, FastPath) else None
        self._starting = False  # on_headers_complete is running (it starts the request's cycle, or queues it)
        self._held: tuple[RequestResponseCycle, Hot] | None = None

    def on_headers_complete(self) -> None:
        self._starting = self.fast is not None and not self.expect_100_continue
        try:
            super().on_headers_complete()
        finally:
            self._starting = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # called by on_headers_complete for a request that can start now (pipelined ones start later, as ASGI)
        if self._starting and app is self.app:
            hot = match(cycle.scope["method"], cycle.scope["path"])
            if hot is not None:
                self._held = (cycle, hot)
                return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        held = self._held
        if held is not None and len(held[0].body) > HIGH_WATER_LIMIT:  # uvicorn paused reading: let ASGI stream it
            self._held = None
            super()._start_asgi_task(held[0], self.app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        held, self._held = self._held, None
        if held is not None:
            task = self.loop.create_task(self._answer(*held))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    async def _answer(self, cycle: RequestResponseCycle, hot: Hot) -> None:
        fast = self.fast
        assert fast is not None
        t0 = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        try:
            answer = await fast.answer(hot, cycle.scope["headers"], bytes(cycle.body))
        except Exception as exc:  # answer() turns errors into responses: this is a bug, still answered
            _log.exception("the fast path failed")
            answer = Answer(500, error_json("internal", f"internal error ({type(exc).__name__}); see the daemon log"))
        except BaseException:  # cancelled (shutdown past its grace period): the request stays unanswered
            self.transport.close()
            raise
        if answer is None:
            await cycle.run_asgi(self.app)  # the body is still in the cycle: the app reads it as usual
            return
        status, body = answer.status, answer.body
        if not cycle.disconnected:
            head = [STATUS_LINE[status]]
            head += [b"%s: %s\r\n" % pair for pair in cycle.default_headers]
            head += [_JSON, b"%d\r\n" % len(body), b"\r\n" if cycle.keep_alive else b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:  # HTTP/1.0, "connection: close", or the server is shutting down
                self.transport.close()
            cycle.on_response()
        if answer.after is not None:
            answer.after()
        fast.observe(cycle.scope["method"], hot.route.path, status, time.perf_counter() - t0)
