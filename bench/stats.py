"""Percentiles for benchmark samples (nearest-rank, no interpolation)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "p50": self.p50, "p95": self.p95, "p99": self.p99, "mean": self.mean,
                "min": self.min, "max": self.max}  # fmt: skip


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(samples: list[float]) -> Summary:
    s = sorted(samples)
    return Summary(
        n=len(s),
        p50=percentile(s, 50),
        p95=percentile(s, 95),
        p99=percentile(s, 99),
        mean=statistics.fmean(s),
        min=s[0],
        max=s[-1],
    )
