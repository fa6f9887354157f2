"""The one stats snapshot of a cache engine: counters, L1 usage, each lower tier, latencies.

:meth:`lmcache.engine.CacheEngine.snapshot` builds an :class:`EngineSnapshot`; the Prometheus
collector, ``/health``, ``lmcache stats`` and the cache server read only that. Every type here is
a frozen dataclass of plain values, so a snapshot is safe to hand to another thread, and msgspec
encodes and decodes it as it is (:func:`encode_snapshot`, :func:`decode_snapshot`): the cache
server sends it over the wire without a conversion of its own.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

__all__ = [
    "LATENCY_BUCKETS_S",
    "EngineCounters",
    "EngineSnapshot",
    "HistogramSnapshot",
    "L1Snapshot",
    "LatencyHistogram",
    "LatencySnapshot",
    "LatencyStats",
    "TierSnapshot",
    "decode_snapshot",
    "encode_snapshot",
    "summary_lines",
]


@dataclass
class EngineCounters:
    """Totals since the engine started. The engine updates its own under its lock; a snapshot
    holds a copy taken under that lock."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    retrieved_chunks: int = 0
    retrieved_bytes: int = 0
    failed_retrieves: int = 0

    @property
    def hit_rate(self) -> float:
        """Hit tokens over requested tokens (0 before the first lookup)."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


@dataclass(frozen=True)
class L1Snapshot:
    """The pinned host cache: bytes held, host memory reserved so far, capacity, chunks, counters."""

    used_bytes: int
    reserved_bytes: int
    capacity_bytes: int
    chunks: int
    pinned_chunks: int
    evictions: int
    skipped_stores: int
    eviction_policy: str


@dataclass(frozen=True)
class TierSnapshot:
    """One lower tier (``name`` is ``disk``, ``remote``, ...): traffic, errors, usage and health.

    ``healthy`` is False from a failure until an operation succeeds again, and once the tiers are
    closed; ``reason`` then says why in words. Usage fields are None where the tier cannot know them
    cheaply (a shared Redis). ``state`` says what a tier is busy with besides serving, healthy or
    not (the disk tier's start-up scan: ``scanning (N files indexed so far)``), else None.
    """

    name: str
    where: str
    healthy: bool
    reason: str | None
    hits: int
    read_bytes: int
    writes: int
    write_bytes: int
    dropped_writes: int
    corrupt_chunks: int
    failures: int
    used_bytes: int | None = None
    capacity_bytes: int | None = None
    chunks: int | None = None
    evictions: int | None = None
    state: str | None = None


@dataclass(frozen=True)
class HistogramSnapshot:
    """A fixed-bucket histogram: ``counts[i]`` is per bucket (not cumulative), ``bounds[i]`` its
    inclusive upper bound; the last count is above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class LatencySnapshot:
    """Host time of lookup calls, and of store and retrieve calls that had chunks to move."""

    lookup: HistogramSnapshot
    store: HistogramSnapshot
    retrieve: HistogramSnapshot


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything an operator sees about one engine, taken at one call."""

    chunk_size: int
    counters: EngineCounters
    l1: L1Snapshot
    tiers: tuple[TierSnapshot, ...]
    latency: LatencySnapshot
    pinned_lookups: int
    promotion_failures: int

    @property
    def healthy(self) -> bool:
        """True while every configured lower tier is up (L1 is always up)."""
        return all(tier.healthy for tier in self.tiers)

    def tier(self, name: str) -> TierSnapshot:
        """The tier called ``name``; KeyError naming the configured ones if there is none."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(f"no {name!r} tier; configured: {[t.name for t in self.tiers] or 'none'}")


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

    def snapshot(self) -> HistogramSnapshot:
        """Per-bucket counts (the last is above every bound) and the sum of the observations."""
        with self._lock:
            return HistogramSnapshot(self.buckets, tuple(self._counts), self._sum)


class LatencyStats:
    """Host time spent in lookup calls, and in store and retrieve calls that had chunks to move."""

    def __init__(self) -> None:
        self.lookup = LatencyHistogram()
        self.store = LatencyHistogram()
        self.retrieve = LatencyHistogram()

    def snapshot(self) -> LatencySnapshot:
        return LatencySnapshot(self.lookup.snapshot(), self.store.snapshot(), self.retrieve.snapshot())


def encode_snapshot(snapshot: EngineSnapshot) -> bytes:
    """The snapshot as msgpack (what the cache server sends)."""
    return msgspec.msgpack.encode(snapshot)


def decode_snapshot(data: bytes) -> EngineSnapshot:
    """The inverse of :func:`encode_snapshot`; ``msgspec.ValidationError`` on a malformed payload."""
    return msgspec.msgpack.decode(data, type=EngineSnapshot)


def summary_lines(snapshot: EngineSnapshot) -> list[str]:
    """A few human lines about the engine (``lmcache stats``): L1, lookups, traffic, each tier."""
    gib = 1 << 30
    c, l1 = snapshot.counters, snapshot.l1
    lines = [
        f"L1: {l1.used_bytes / gib:.2f} GiB used in {l1.chunks} chunks, {l1.reserved_bytes / gib:.2f} of "
        f"{l1.capacity_bytes / gib:.2f} GiB reserved, {l1.evictions} evictions ({l1.eviction_policy}), "
        f"chunk_size {snapshot.chunk_size}",
        f"lookups {c.lookups}: {c.hit_tokens} of {c.lookup_tokens} tokens hit ({c.hit_rate:.1%}); "
        f"{snapshot.pinned_lookups} pinned",
        f"stored {c.stored_chunks} chunks ({c.stored_bytes / gib:.2f} GiB), retrieved "
        f"{c.retrieved_chunks} chunks ({c.retrieved_bytes / gib:.2f} GiB)",
    ]
    for t in snapshot.tiers:
        state = "up" if t.healthy else f"DOWN ({t.reason})"
        if t.state:
            state += f", {t.state}"
        lines.append(
            f"{t.name} {t.where}: {state}; {t.hits} hits ({t.read_bytes / gib:.2f} GiB), {t.writes} "
            f"writes ({t.write_bytes / gib:.2f} GiB), {t.dropped_writes} dropped, "
            f"{t.corrupt_chunks} corrupt, {t.failures} failures"
        )
    return lines
