"""Events the Manager emits for metrics and logs. Subscribers must be fast and must not raise.

They get each event soon after it happened, not during the call that made it: in order, once the event loop's
current step is done (so a create returns to its caller before the events it made are counted)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("branchbox.manager")


@dataclass(frozen=True, slots=True)
class ManagerEvent:
    """``kind`` is one of: create, exec, destroy, error, state.

    - create: backend, source (cold|warm|snapshot), outcome (ok|error), seconds, timings (phase -> ms)
    - exec: backend, outcome, seconds
    - destroy: backend, outcome, seconds
    - error: code (a stable error code), operation
    - state: the per-state counts changed (``counts``)
    """

    kind: str
    sandbox_id: str | None = None
    backend: str = ""
    source: str = ""
    outcome: str = "ok"
    seconds: float = 0.0
    code: str = ""
    operation: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)


Subscriber = Callable[[ManagerEvent], None]


@dataclass(frozen=True, slots=True)
class _Subscription:
    fn: Subscriber
    kinds: frozenset[str] | None  # None: every kind

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


class EventBus:
    """The Manager's subscribers and the events queued for them."""

    def __init__(self) -> None:
        self._subscribers: list[_Subscription] = []
        self._queued: list[ManagerEvent] = []  # emitted, handed to the subscribers at the end of the loop's turn

    def subscribe(self, fn: Subscriber, kinds: Collection[str] | None = None) -> None:
        self._subscribers.append(_Subscription(fn, None if kinds is None else frozenset(kinds)))

    def wanted(self, kind: str) -> bool:
        return any(sub.wants(kind) for sub in self._subscribers)

    def emit(self, ev: ManagerEvent) -> None:
        """Queue ``ev`` for the subscribers, who get it soon after (in order, once the current step of the event
        loop is done): a create or an exec returns to its caller first, and the daemon answers it before its
        metrics are counted. Outside an event loop they get it at once."""
        if not self.wanted(ev.kind):
            return
        self._queued.append(ev)
        if len(self._queued) > 1:  # a delivery is scheduled already
            return
        try:
            asyncio.get_running_loop().call_soon(self._deliver)
        except RuntimeError:
            self._deliver()

    def _deliver(self) -> None:
        events, self._queued = self._queued, []
        for ev in events:
            for sub in self._subscribers:
                if not sub.wants(ev.kind):
                    continue
                try:
                    sub.fn(ev)
                except Exception:
                    log.exception("event subscriber failed")
