"""How much slower this host runs code that has not run for a few ms (``host:`` rows of ``make bench``).

Every API request runs code that last ran one request ago, some ms earlier: the SDK's request building, the
kernel's loopback path, the daemon's parse and check, the answer. On some hosts (shared cores, a hypervisor that
flushes or shares caches) code runs many times slower when its caches went cold meanwhile, so a cross-process
round trip costs far more than the same code run back to back. The in-process Manager runs less code per call, so
the API's added time grows with this factor more than the work does.

The probe is the daemon's own front of one exec request (parse of the raw HTTP request, route match, body
validation), timed back to back and then 5 ms after its previous run, the process either asleep or spinning
meanwhile (spinning: the slowdown is the time its caches sat unused, not the sleep and wake-up).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from branchbox.api.fastpath import match
from branchbox.api.schemas import RunCommandRequest
from branchbox.daemon.http_front import parse_plain
from stats import Summary, summarize

GAP_S = 0.005
_BODY = b'{"cmd":"true"}'
_REQUEST = (
    b"POST /v1/sandboxes/8a455d7e828df0e9e5aa3c1f/commands HTTP/1.1\r\nhost: 127.0.0.1:7077\r\n"
    b"user-agent: branchbox-sdk/0.1\r\naccept: application/json\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


def request_front() -> None:
    """What the daemon runs of one exec request before the Manager sees it."""
    parsed = parse_plain(_REQUEST)
    assert parsed is not None
    request, path = parsed
    assert match(request.scope["method"], path) is not None
    RunCommandRequest.model_validate_json(request.body)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _timed(gap: Callable[[], None] | None, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        if gap is not None:
            gap()
        t0 = time.perf_counter()
        request_front()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_host(runs: int, results: dict[str, Summary]) -> None:
    n = max(runs, 50) * 4
    _timed(None, 100)  # imports, first-call caches
    label = "host: the daemon's parse and check of one exec request"
    back = results[f"{label}, back to back"] = summarize(_timed(None, n))
    asleep = results[f"{label}, {GAP_S * 1e3:.0f} ms after its last run (asleep)"] = summarize(
        _timed(lambda: time.sleep(GAP_S), n)
    )
    results[f"{label}, {GAP_S * 1e3:.0f} ms after its last run (spinning)"] = summarize(_timed(lambda: _spin(GAP_S), n))
    print(f"host: code idle for {GAP_S * 1e3:.0f} ms runs {asleep.p50 / back.p50:.1f}x slower at p50", flush=True)
