"""Events the Manager emits for metrics and logs. Subscribers must be fast and must not raise.

They get each event soon after it happened, not during the call that made it: in order, once the event loop's
current step is done (so a create returns to its caller before the events it made are counted)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


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
