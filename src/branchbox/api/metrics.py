"""Prometheus metrics on a registry owned by one app (never the global default registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from branchbox.core.disk import Pressure
from branchbox.core.events import ManagerEvent
from branchbox.core.pool import PoolStats
from branchbox.models import SandboxState

CONTENT_TYPE = CONTENT_TYPE_LATEST
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PoolCollector(Collector):
    """Per-pool gauges and counters read from the Manager's pool statistics at scrape time."""

    def __init__(self, source: Callable[[], Sequence[PoolStats]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        stats = self._source()
        labels = ["template", "backend"]  # a template has one pool per backend
        gauges = {
            "ready": GaugeMetricFamily("branchbox_pool_ready", "Ready members of a warm pool.", labels=labels),
            "booting": GaugeMetricFamily("branchbox_pool_booting", "Members booting.", labels=labels),
            "claimed": GaugeMetricFamily(
                "branchbox_pool_claimed", "Sandboxes claimed from a pool, still alive.", labels=labels
            ),
            "target": GaugeMetricFamily("branchbox_pool_target", "Members the replenisher aims for.", labels=labels),
        }
        counters = {
            "hits": CounterMetricFamily("branchbox_pool_hits", "Creates served warm.", labels=labels),
            "misses": CounterMetricFamily("branchbox_pool_misses", "Creates that found the pool empty.", labels=labels),
            "boot_failures": CounterMetricFamily("branchbox_pool_boot_failures", "Failed member boots.", labels=labels),
            "replaced": CounterMetricFamily(
                "branchbox_pool_replaced", "Members that died and were replaced.", labels=labels
            ),
        }
        for s in stats:
            for name, g in gauges.items():
                g.add_metric([s.template, s.backend], s.config.target if name == "target" else getattr(s, name))
            for name, c in counters.items():
                c.add_metric([s.template, s.backend], getattr(s, name))
        yield from gauges.values()
        yield from counters.values()


class StateCollector(Collector):
    """``branchbox_sandboxes{state}``, counted at scrape time (not on every create and destroy)."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        counts = self._source()
        gauge = GaugeMetricFamily("branchbox_sandboxes", "Sandboxes by state.", labels=["state"])
        for state in SandboxState:
            gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge


class DiskCollector(Collector):
    """The data dir's filesystem, read at scrape time (``statvfs``, ~2 us): what is left for sandboxes' writable
    layers, snapshot layers and the daemon's own state.db, the reserve kept for the latter, and what the sandboxes
    hold together (core/disk.py). Disk pressure shows here before writes fail."""

    def __init__(self, source: Callable[[], Pressure]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        try:
            p = self._source()
        except OSError:
            return
        yield _gauge("branchbox_data_dir_free_bytes", "Bytes an unprivileged writer may still use on the data dir's "
                     "filesystem.", p.free)  # fmt: skip
        yield _gauge("branchbox_data_dir_size_bytes", "Size of the data dir's filesystem.", p.size)
        yield _gauge("branchbox_data_dir_reserve_bytes", "Free space the daemon keeps for its own state (reserve_mb).",
                     p.reserve)  # fmt: skip
        yield _gauge("branchbox_disk_pressure", "1 when free space is down to the reserve: creates, forks and "
                     "snapshots are refused with disk_full.", int(p.low))  # fmt: skip
        if p.sandboxes is not None and p.sandboxes_limit is not None:
            yield _gauge("branchbox_sandboxes_disk_bytes", "Bytes the daemon's sandboxes' writable layers hold "
                         "together (at the last refresh).", p.sandboxes)  # fmt: skip
            yield _gauge("branchbox_sandboxes_disk_limit_bytes", "What they may hold together: free space beyond "
                         "the reserve (at the last refresh).", p.sandboxes_limit)  # fmt: skip


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class _Children:
    """Labelled children of metrics, looked up once per label tuple (``labels()`` costs ~10 us per call)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], Any] = {}

    def __call__(self, metric: Histogram | Counter | Gauge, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*values)
        return child


class Metrics:
    """Every metric the daemon exports. ``on_event`` is the Manager subscriber, of the ``EVENT_KINDS`` (the
    sandboxes by state are counted at each scrape instead)."""

    EVENT_KINDS = frozenset({"create", "exec", "destroy", "error"})

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.create_duration = Histogram(
            "branchbox_create_duration_seconds",
            "Sandbox create latency, by backend, source (warm|cold|snapshot) and outcome (ok|error).",
            ["backend", "source", "outcome"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.exec_duration = Histogram(
            "branchbox_exec_duration_seconds",
            "Command run latency (start to exit) inside sandboxes.",
            ["backend", "outcome"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.destroy_duration = Histogram(
            "branchbox_destroy_duration_seconds",
            "Sandbox destroy latency.",
            ["backend", "outcome"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.api_duration = Histogram(
            "branchbox_api_request_duration_seconds",
            "HTTP request latency, by method, route template and status code.",
            ["method", "route", "status"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "branchbox_errors",
            "Errors by stable code; layer is core (Manager operations) or api (error responses).",
            ["code", "layer"],
            registry=r,
        )
        # the daemon's own process_resident_memory_bytes, process_open_fds, ...: what a leak shows in first
        ProcessCollector(registry=r)
        self.agent_calls = Gauge(
            "branchbox_agent_open_calls",
            "Calls and streams open on sandboxes' agents (each holds a channel, a task and buffers in the daemon).",
            registry=r,
        )
        self._pools: PoolCollector | None = None
        self._states: StateCollector | None = None
        self._disk: DiskCollector | None = None
        self._child = _Children()

    def on_event(self, event: ManagerEvent) -> None:
        """Manager subscriber: fast, never raises."""
        try:
            backend = event.backend or "unknown"
            if event.kind == "create":
                child = self._child(self.create_duration, backend, event.source or "cold", event.outcome)
                child.observe(event.seconds)
            elif event.kind == "exec":
                self._child(self.exec_duration, backend, event.outcome).observe(event.seconds)
            elif event.kind == "destroy":
                self._child(self.destroy_duration, backend, event.outcome).observe(event.seconds)
            elif event.kind == "error":
                self._child(self.errors, event.code or "internal", "core").inc()
        except Exception:  # noqa: S110 - a metrics bug must never break a Manager operation
            pass

    def watch_pools(self, source: Callable[[], Sequence[PoolStats]]) -> None:
        """Export the pools ``source`` reports (called at each scrape). Once per Metrics."""
        if self._pools is None:
            self._pools = PoolCollector(source)
            self.registry.register(self._pools)

    def watch_states(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Export the sandboxes by state that ``source`` counts (called at each scrape). Once per Metrics."""
        if self._states is None:
            self._states = StateCollector(source)
            self.registry.register(self._states)

    def watch_agent_calls(self, source: Callable[[], int]) -> None:
        """Export the open agent calls that ``source`` counts (called at each scrape)."""
        self.agent_calls.set_function(source)

    def watch_disk(self, source: Callable[[], Pressure]) -> None:
        """Export the data dir's disk pressure that ``source`` reports (read at each scrape). Once per Metrics."""
        if self._disk is None:
            self._disk = DiskCollector(source)
            self.registry.register(self._disk)

    def count_api_error(self, code: str) -> None:
        self._child(self.errors, code, "api").inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.api_duration, method, route, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
