"""The connection protocol on the agent's side: frames in, calls dispatched to the methods (``handlers``) and to
the calls still running (:class:`Handler`), RESULT frames out. docs/agent-protocol.md."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import wire
from .errors import CallError, os_error
from .supervise import Agent

AGENT_VERSION = "0.1.0"


class Handler:
    """A call that keeps receiving frames after its CALL (exec, attach, files.read, files.write)."""

    def __init__(self, conn: Connection, channel: int) -> None:
        self.conn = conn
        self.channel = channel
        self.window = wire.INITIAL_WINDOW  # DATA bytes the host may still send on this call
        conn.calls[channel] = self

    def received(self, n: int) -> None:
        """``n`` bytes of the host's DATA arrived: beyond the credit granted is a protocol error."""
        self.window -= n
        if self.window < 0:
            raise wire.ProtocolError(f"the host sent DATA beyond its window on channel {self.channel}")

    def end(self, body: dict[str, Any]) -> None:
        if self.conn.calls.get(self.channel) is self:
            del self.conn.calls[self.channel]
            self.conn.send(result_frame(self.channel, body))

    def on_data(self, stream: int, data: bytes) -> None:
        """Host sent input (ignored unless overridden)."""

    def on_eof(self, stream: int) -> None:
        """Host closed its input (ignored unless overridden)."""

    def on_window(self, credit: int) -> None:
        """Host granted credit (ignored unless overridden)."""

    def on_cancel(self) -> None:
        self.end({"error": {"code": "cancelled", "message": "cancelled by the host"}})

    def on_lost(self) -> None:
        """The connection closed."""


def result_frame(channel: int, body: dict[str, Any]) -> bytes:
    """RESULT frame: ``body`` is either ``{"error": {...}}`` or the method's result object."""
    if "error" in body:
        return wire.encode_json(wire.RESULT, channel, body)
    return wire.encode_json(wire.RESULT, channel, {"result": body})


class Connection(asyncio.Protocol):
    """One host connection: parses frames and dispatches them to methods and running calls."""

    def __init__(self, agent: Agent, methods: Mapping[str, Method], *, host_starts: bool = False) -> None:
        self.agent = agent
        self.methods = methods  # name -> method (handlers.METHODS)
        self.host_starts = host_starts  # a character device: the host opens each session with a HELLO
        self.parser = wire.FrameParser()
        self.calls: dict[int, Handler] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.agent.connections.add(self)
        if not self.host_starts:
            transport.write(wire.encode_json(wire.HELLO, 0, self.hello()))

    def hello(self, nonce: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "protocol": wire.PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "methods": sorted(self.methods),
        }
        if nonce is not None:
            body["nonce"] = nonce
        return body

    def new_session(self, payload: bytes) -> None:
        """A HELLO from the host: the calls of the previous session end as on a lost connection; answer HELLO."""
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.on_lost()
        try:
            req = wire.decode_json(payload) if payload else {}
        except wire.ProtocolError:
            req = {}
        nonce = req.get("nonce") if isinstance(req, dict) else None
        self.send(wire.encode_json(wire.HELLO, 0, self.hello(nonce if isinstance(nonce, str) else None)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.connections.discard(self)
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.on_lost()
        self.transport = None

    def send(self, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
            for kind, channel, payload in frames:
                if kind == wire.CALL:
                    self.on_call(channel, payload)
                    continue
                if kind == wire.HELLO:
                    self.new_session(payload)
                    continue
                call = self.calls.get(channel)
                if call is None:
                    continue  # late frame for a call that already ended
                if kind == wire.DATA:
                    stream, chunk = wire.split_stream(payload)
                    call.received(len(chunk))
                    call.on_data(stream, chunk)
                elif kind == wire.WINDOW:
                    call.on_window(wire.decode_window(payload))
                elif kind == wire.EOF:
                    call.on_eof(wire.split_stream(payload)[0])
                elif kind == wire.CANCEL:
                    call.on_cancel()
        except wire.ProtocolError as exc:
            print(f"branchbox agent: closing connection: {exc}", file=sys.stderr)
            if self.transport is not None:
                self.transport.abort()

    def on_call(self, channel: int, payload: bytes) -> None:
        busy = channel in self.calls
        try:
            func, params = self.parse_call(channel, payload)
            result = func(self, channel, params)
        except CallError as exc:
            result = {"error": exc.to_dict()}
        except OSError as exc:
            result = {"error": os_error(exc).to_dict()}
        except wire.ProtocolError as exc:
            result = {"error": {"code": "bad_request", "message": str(exc)}}
        except (TypeError, ValueError, KeyError) as exc:
            result = {"error": {"code": "bad_request", "message": f"bad params: {exc!r}"}}
        except Exception as exc:  # keep serving: report the bug to the host
            result = {"error": {"code": "internal", "message": f"agent bug: {exc!r}"}}
        if result is not None:
            if not busy:  # drop a handler the failing method may have registered
                self.calls.pop(channel, None)
            self.send(result_frame(channel, result))

    def parse_call(self, channel: int, payload: bytes) -> tuple[Method, dict[str, Any]]:
        if channel in self.calls:
            raise CallError("bad_request", f"channel {channel} already has a running call")
        msg = wire.decode_json(payload)
        if not isinstance(msg, dict):
            raise CallError("bad_request", "CALL payload must be a JSON object")
        method = msg.get("method")
        params = msg.get("params") or {}
        func = self.methods.get(method) if isinstance(method, str) else None
        if func is None:
            raise CallError("bad_request", f"unknown method {method!r}: see HELLO 'methods'")
        if not isinstance(params, dict):
            raise CallError("bad_request", "params must be a JSON object")
        return func, params


# -- methods: each returns the RESULT body, or None when a Handler will end the call ------------------
Method = Callable[[Connection, int, dict[str, Any]], "dict[str, Any] | None"]
