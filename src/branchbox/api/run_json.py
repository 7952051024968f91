"""The JSON body of a foreground run's result, written in parts when the kept output is large.

A run keeps up to ``max_output_mb`` (64 MiB) of each stream; encoded whole as JSON that could cost six times as
much again (a NUL byte is ``\\u0000``), on top of the output itself: ``head -c 1500M /dev/zero`` peaked the daemon
at +850 MiB. A large result is instead encoded one slice of output at a time, twice: once to count its length
(so the response has a ``content-length`` and the SDKs read it as any other body) and once while it is written,
with the transport's backpressure between parts. The daemon then holds the kept output plus one part, whatever
the bytes are. The body is byte for byte what pydantic writes for :class:`~branchbox.api.schemas.CommandResult`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass

from branchbox.api.schemas import CommandResult
from branchbox.models import ExecResult

STREAM_ABOVE = 1 << 20  # kept output (both streams) above which the body is written in parts
PART = 1 << 18  # bytes of output per part (at most 1.5 MiB of JSON, ~4 ms to encode)


@dataclass(frozen=True, slots=True)
class StreamedJson:
    """A JSON body of known ``length``, produced part by part (each :meth:`parts` call starts over)."""

    length: int
    result: ExecResult
    skeleton: bytes  # the result's JSON with both outputs empty

    def parts(self) -> Iterator[bytes]:
        out_at = self.skeleton.index(b'"stdout":""') + len(b'"stdout":"')
        err_at = self.skeleton.index(b'"stderr":""') + len(b'"stderr":"')
        yield self.skeleton[:out_at]
        yield from _text_parts(self.result.stdout)
        yield self.skeleton[out_at:err_at]
        yield from _text_parts(self.result.stderr)
        yield self.skeleton[err_at:]


def _text_parts(data: bytes) -> Iterator[bytes]:
    """``data`` decoded as UTF-8 with errors replaced (as ``bytes.decode``), as JSON string contents, in parts."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    view = memoryview(data)
    for start in range(0, len(data), PART):
        text = decoder.decode(view[start : start + PART], final=start + PART >= len(data))
        if text:
            yield json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")  # 2x pydantic_core's speed on NULs


async def command_result(result: ExecResult) -> CommandResult | StreamedJson:
    """The response to a foreground run: the model when small, else the body in parts (counted in a thread: up
    to ~1 s for 64 MiB of NUL bytes)."""
    if len(result.stdout) + len(result.stderr) <= STREAM_ABOVE:
        return _model(result, result.stdout_text, result.stderr_text)
    empty = _model(result, "", "")
    skeleton = empty.__pydantic_serializer__.to_json(empty)
    uncounted = StreamedJson(0, result, skeleton)
    length = await asyncio.to_thread(lambda: sum(len(p) for p in uncounted.parts()))
    return StreamedJson(length, result, skeleton)


def _model(result: ExecResult, stdout: str, stderr: str) -> CommandResult:
    return CommandResult(
        exit_code=result.exit_code,
        stdout=stdout,
        stderr=stderr,
        signal=result.signal,
        duration_ms=result.duration_ms,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
    )
