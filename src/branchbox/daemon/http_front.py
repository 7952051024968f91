"""The daemon's HTTP/1.1 protocol: uvicorn's httptools protocol, with the hot routes answered without ASGI.

uvicorn turns every request into an ASGI call: httptools' callbacks fill a scope, a request cycle and a task run
the app through its middlewares, ``receive`` awaits the body, and two ``send`` messages are checked and written
as two writes. For the three routes that carry most traffic (:func:`branchbox.api.fastpath.match`) this protocol
calls :meth:`FastPath.prepare` with the whole request, answers in a task of its own and writes the status line,
headers and body in one write. uvicorn's handling of the connection stays: keep-alive and its timeout,
pipelining (a request that comes while another is answered waits, as in uvicorn), shutdown, a lost connection.

What the fast path declines (not JSON, a body that fails validation, ``background=true``), a body above uvicorn's
read buffer limit, and every other request run as uvicorn runs them: as ASGI, through the app.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from branchbox.api.fastpath import Answer, FastPath, Hot, match
from branchbox.api.responses import error_json
from branchbox.api.run_json import StreamedJson

_log = logging.getLogger("branchbox.daemon")
_JSON = b"content-type: application/json\r\ncontent-length: "
# the request line and header fields of a plain request: visible ASCII only, no percent-escapes, tokens as names
_REQUEST_LINE = re.compile(rb"(GET|POST) (/[^\x00-\x20\x7f%?#]*)(?:\?[^\x00-\x20\x7f#]*)? HTTP/1\.1\r\n")
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*\r\n)*")  # each line a name: value
_REFUSED = (b"transfer-encoding", b"upgrade", b"expect")
Job = Callable[[], Awaitable[Answer]]


class _Done:
    """``message_event`` of a plain request: nothing waits on it."""

    def set(self) -> None:
        pass


_DONE = _Done()


class Plain:
    """A whole request of the plain shape the SDKs send, read in one piece; while it is answered it stands where
    uvicorn keeps its request cycle, so uvicorn's own code (pipelining, shutdown, a lost connection) sees a
    request in flight."""

    __slots__ = ("body", "default_headers", "disconnected", "keep_alive", "on_response", "response_complete", "scope")

    def __init__(self, method: str, headers: list[tuple[bytes, bytes]], body: bytes, *, keep_alive: bool) -> None:
        self.scope: dict[str, Any] = {"method": method, "headers": headers}
        self.body = body
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False
        self.default_headers: list[tuple[bytes, bytes]] = []
        self.on_response: Callable[[], None] = lambda: None

    @property
    def message_event(self) -> _Done:
        return _DONE


def parse_plain(data: bytes) -> tuple[Plain, str] | None:  # noqa: PLR0911 - flat
    """``data`` as one whole plain request (GET or POST, HTTP/1.1, visible-ASCII fields, a content-length body
    or none, nothing after it) and its path; None for anything else, which httptools then parses."""
    end = data.find(b"\r\n\r\n")
    line = _REQUEST_LINE.match(data) if end >= 0 else None
    if line is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    keep_alive = True
    fields = data[line.end() : end + 2]
    if _FIELDS.fullmatch(fields) is None:
        return None
    for field in fields.split(b"\r\n")[:-1]:
        name, _, value = field.partition(b":")
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name in _REFUSED:
            return None
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            keep_alive = b"close" not in tokens
        headers.append((name, value))
    body = data[end + 4 :]
    method = line.group(1).decode("ascii")
    if len(body) != (length or 0) or (method == "GET" and body):
        return None
    return Plain(method, headers, body, keep_alive=keep_alive), line.group(2).decode("ascii")


class FrontProtocol(HttpToolsProtocol):
    """One connection. A hot request is answered by :meth:`_answer` instead of as ASGI, in one of two ways:

    * plain (:func:`parse_plain`), the usual case: one whole request in one read on an idle connection, parsed
      here without httptools' callbacks, uvicorn's scope and its request cycle;
    * otherwise httptools parses it (across reads, after another request), and its cycle is created as uvicorn
      creates it but held, not started as ASGI, until its body is complete.
    """

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
        self._between = True  # httptools is between two messages (it has none partly read)
        self._starting = False  # on_headers_complete is running (it starts the request's cycle, or queues it)
        self._held: tuple[RequestResponseCycle, Hot] | None = None

    def data_received(self, data: bytes) -> None:
        plain = self._plain(data)
        if plain is None:
            super().data_received(data)
            return
        request, hot, job = plain
        self._unset_keepalive_if_required()
        request.default_headers = self.server_state.default_headers
        request.on_response = self.on_response_complete
        self.cycle = request  # type: ignore[assignment]  # Plain has what uvicorn reads of a cycle
        self._start(request, hot, job)

    def _plain(self, data: bytes) -> tuple[Plain, Hot, Job] | None:
        """``data`` as a plain hot request on an idle connection, checked by the fast path; else None."""
        if self.fast is None or not self._between or not (self.cycle is None or self.cycle.response_complete):
            return None
        parsed = parse_plain(data)
        if parsed is None:
            return None
        request, path = parsed
        hot = match(request.scope["method"], path)
        job = None if hot is None else self.fast.prepare(hot, request.scope["headers"], request.body)
        return None if hot is None or job is None else (request, hot, job)

    def on_message_begin(self) -> None:
        self._between = False
        super().on_message_begin()

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
        self._between = True
        super().on_message_complete()
        held, self._held = self._held, None
        if held is None:
            return
        cycle, hot = held
        assert self.fast is not None
        job = self.fast.prepare(hot, cycle.scope["headers"], bytes(cycle.body))
        if job is None:  # the app answers it; the body is still in the cycle, read as usual
            super()._start_asgi_task(cycle, self.app)
        else:
            self._start(cycle, hot, job)

    def _start(self, request: RequestResponseCycle | Plain, hot: Hot, job: Job) -> None:
        task = self.loop.create_task(self._answer(request, hot, job))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer(self, request: RequestResponseCycle | Plain, hot: Hot, job: Job) -> None:
        assert self.fast is not None
        t0 = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        try:
            answer = await job()
        except Exception as exc:  # jobs turn errors into responses: this is a bug, still answered
            _log.exception("the fast path failed")
            answer = Answer(500, error_json("internal", f"internal error ({type(exc).__name__}); see the daemon log"))
        except BaseException:  # cancelled (shutdown past its grace period): the request stays unanswered
            self.transport.close()
            raise
        status, body = answer.status, answer.body
        if not request.disconnected:
            length = body.length if isinstance(body, StreamedJson) else len(body)
            head = [STATUS_LINE[status]]
            head += [b"%s: %s\r\n" % pair for pair in request.default_headers]
            head += [_JSON, b"%d\r\n" % length, b"\r\n" if request.keep_alive else b"connection: close\r\n\r\n"]
            if isinstance(body, StreamedJson):
                self.transport.write(b"".join(head))
                if not await self._write_parts(request, body):
                    return
            else:
                self.transport.write(b"".join(head) + body)
            request.response_complete = True
            request.message_event.set()
            if not request.keep_alive:  # HTTP/1.0, "connection: close", or the server is shutting down
                self.transport.close()
            request.on_response()
        if answer.after is not None:
            answer.after()
        self.fast.observe(request.scope["method"], hot.route.path, status, time.perf_counter() - t0)

    async def _write_parts(self, request: RequestResponseCycle | Plain, body: StreamedJson) -> bool:
        """Write a body in parts, each once the transport is below its high-water mark (the client reads);
        False when the client went away first (the connection is then closed)."""
        for part in body.parts():
            await self.flow.drain()
            if request.disconnected or self.transport.is_closing():
                self.transport.close()
                return False
            self.transport.write(part)
        return True
