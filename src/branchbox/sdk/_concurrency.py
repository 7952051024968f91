"""The few primitives the SDK's two flavours cannot share, one hand-written pair each (as httpcore keeps its
``_synchronization`` module): ``scripts/gen_sync.py`` turns ``acall`` into ``call`` and ``aoffload`` into
``offload`` when it generates the ``_sync*.py`` twins from ``_async*.py``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def acall(cb: Callable[[Any], object] | None, arg: Any) -> None:
    """Call an output callback; a callback that returns an awaitable (a coroutine function) is awaited."""
    if cb is not None:
        result = cb(arg)
        if inspect.isawaitable(result):
            await result


def call(cb: Callable[[Any], object] | None, arg: Any) -> None:
    """Call an output callback."""
    if cb is not None:
        cb(arg)


async def aoffload(fn: Callable[..., T], *args: Any) -> T:
    """Blocking local work (packing or unpacking a tar) on a worker thread, off the event loop."""
    return await asyncio.to_thread(fn, *args)


def offload(fn: Callable[..., T], *args: Any) -> T:
    """Blocking local work, in the caller's thread (the sync flavour has no event loop to keep free)."""
    return fn(*args)
