"""Latency histograms of the engine's calls (exported by ``lmcache.metrics``)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

# Upper bounds (seconds) of the latency histograms' buckets; the last bucket is +Inf.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class LatencyHistogram:
    """Fixed-bucket histogram of call durations, filled at call time (thread-safe, O(log buckets))."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # per bucket, not cumulative; last = +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self.buckets, seconds)  # first bound >= seconds ("le" semantics)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        """Per-bucket counts (the last is above every bound) and the sum of the observations."""
        with self._lock:
            return list(self._counts), self._sum


class LatencyStats:
    """Host time spent in lookup calls, and in store and retrieve calls that had chunks to move."""

    def __init__(self) -> None:
        self.lookup = LatencyHistogram()
        self.store = LatencyHistogram()
        self.retrieve = LatencyHistogram()
