"""Per-phase timing of control-plane operations (create, snapshot, fork)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Records how long each named phase of one operation took, in milliseconds.

    Phases are recorded in order; a phase entered twice accumulates. ``total_ms`` is measured from construction.
    """

    __slots__ = ("_phases", "_start")

    def __init__(self) -> None:
        self._start = time.perf_counter_ns()
        self._phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter_ns() - t0) / 1e6)

    def add(self, name: str, ms: float) -> None:
        self._phases[name] = self._phases.get(name, 0.0) + ms

    @property
    def total_ms(self) -> float:
        return (time.perf_counter_ns() - self._start) / 1e6

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self._phases.items()}
        out["total"] = round(self.total_ms, 3)
        return out
