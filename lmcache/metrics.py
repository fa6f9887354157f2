"""Prometheus metrics and health of a :class:`~lmcache.engine.CacheEngine`, read at scrape time.

Nothing here is global: :class:`EngineCollector` takes the engine's one
:class:`~lmcache.stats.EngineSnapshot` (and, for the cache server, the server's stats) every time it
is collected, and each endpoint registers it in its own ``CollectorRegistry``, so the process's
default registry stays untouched. This module only translates the snapshot; it reads nothing else
of the engine.

Every name starts with ``lmcache_``; counters end in ``_total`` on the wire. See
``docs/operations.md`` for the list and for the health rules of :func:`health_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lmcache.gc_pauses import GcStats
from lmcache.stats import EngineSnapshot, HistogramSnapshot

__all__ = ["EngineCollector", "as_source", "health_report", "make_registry", "tier_health"]


def as_source(obj: Any) -> Callable[[], Any]:
    """``obj`` if it is a zero-argument callable, else a callable returning ``obj``."""
    if obj is None:
        return lambda: None
    return obj if callable(obj) else (lambda: obj)


def snapshot_of(engine: Any) -> EngineSnapshot | None:
    """The engine's snapshot, or None for no engine."""
    return None if engine is None else engine.snapshot()


# -- health ---------------------------------------------------------------------------------------


def tier_health(snapshot: EngineSnapshot) -> tuple[dict[str, bool], list[str]]:
    """Health of each configured tier (L1 always; each lower tier when configured) and the reasons
    for any that is down.

    A lower tier is down while its back-off is active, i.e. from its last failure until an
    operation on it succeeds again (the disk after a failed write; the remote tier after a failed
    call, including while its circuit breaker skips it), or once the tiers are closed.
    """
    tiers: dict[str, bool] = {"l1": True}
    reasons: list[str] = []
    for tier in snapshot.tiers:
        tiers[tier.name] = tier.healthy
        if not tier.healthy:
            reasons.append(f"{tier.name} tier {tier.where}: {tier.reason}")
    return tiers, reasons


def health_report(snapshot: EngineSnapshot | None, server: Any = None) -> tuple[bool, dict[str, Any]]:
    """``(healthy, body)`` for ``GET /health``: healthy when every configured tier is up; ``notes``
    says what an up tier is busy with (the disk tier's start-up scan)."""
    if snapshot is None:
        return False, {"status": "degraded", "tiers": {}, "reasons": ["no cache engine in this process yet"]}
    tiers, reasons = tier_health(snapshot)
    healthy = not reasons
    c, l1 = snapshot.counters, snapshot.l1
    body: dict[str, Any] = {
        "status": "ok" if healthy else "degraded",
        "tiers": tiers,
        "reasons": reasons,
        "notes": [f"{t.name} tier {t.where}: {t.state}" for t in snapshot.tiers if t.state],
        "chunk_size": snapshot.chunk_size,
        "l1": {
            "used_bytes": l1.used_bytes,
            "reserved_bytes": l1.reserved_bytes,
            "capacity_bytes": l1.capacity_bytes,
            "chunks": l1.chunks,
            "eviction_policy": l1.eviction_policy,
        },
        "lookups": c.lookups,
        "hit_tokens": c.hit_tokens,
        "requested_tokens": c.lookup_tokens,
        "hit_rate": round(c.hit_rate, 4),
    }
    if server is not None:
        info = _server_info(server)
        if info is not None:
            body["server"] = {
                "server_id": info.server_id,
                "uptime_s": round(info.uptime_s, 1),
                "connected_instances": len(info.instances),
                "pool_sharing": info.pool_sharing,
                "l1_memory": info.l1_memory,
                "instance_sharing": {str(i.instance_id): i.sharing for i in info.instances},
            }
    return healthy, body


def _server_info(server: Any) -> Any:
    try:
        return server.stats()
    except Exception:  # noqa: BLE001 - metrics never break on a server mid-shutdown
        return None


# -- Prometheus -----------------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
    fam.add_metric(list(labels.values()) if labels else [], value)
    return fam


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, hist: HistogramSnapshot) -> Metric:
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*map(repr, hist.bounds), "+Inf"), hist.counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.total)


class EngineCollector(Collector):
    """Collects an engine's counters, gauges and latency histograms (and a cache server's, if given).

    ``engine`` and ``server`` may be the objects or zero-argument callables returning them (or None),
    so one endpoint can follow an engine that is replaced (tests reset the in-process engine).
    """

    def __init__(self, engine: Any, server: Any = None) -> None:
        self._engine = as_source(engine)
        self._server = as_source(server)

    def collect(self) -> Iterator[Metric]:
        snapshot = snapshot_of(self._engine())
        if snapshot is not None:
            yield from self._engine_metrics(snapshot)
        server = self._server()
        if server is not None:
            yield from self._server_metrics(server)

    def _engine_metrics(self, snap: EngineSnapshot) -> Iterator[Metric]:
        s = snap.counters
        yield _counter("lmcache_lookups", "Lookup calls (one per request prefix query).", s.lookups)
        yield _counter(
            "lmcache_lookup_requested_tokens",
            "Tokens asked for by lookups (prompt lengths).",
            s.lookup_tokens,
        )
        yield _counter(
            "lmcache_lookup_hit_tokens", "Tokens of lookups found cached (prefix hits).", s.hit_tokens
        )
        yield _counter("lmcache_stored_chunks", "Chunks newly stored into L1.", s.stored_chunks)
        yield _counter("lmcache_stored_bytes", "KV bytes newly stored into L1.", s.stored_bytes)
        yield _counter("lmcache_retrieved_chunks", "Chunks loaded back into the KV pool.", s.retrieved_chunks)
        yield _counter("lmcache_retrieved_bytes", "KV bytes loaded back into the KV pool.", s.retrieved_bytes)
        yield _counter(
            "lmcache_failed_retrieves",
            "Retrieves that loaded fewer tokens than asked (a chunk was missing).",
            s.failed_retrieves,
        )

        l1 = snap.l1
        yield _gauge("lmcache_chunk_size_tokens", "Tokens per cached chunk.", snap.chunk_size)
        yield _gauge("lmcache_l1_used_bytes", "L1 bytes held by cached chunks.", l1.used_bytes)
        yield _gauge(
            "lmcache_l1_reserved_bytes",
            "L1 host memory allocated so far (grows lazily up to the capacity).",
            l1.reserved_bytes,
        )
        yield _gauge("lmcache_l1_capacity_bytes", "L1 capacity in bytes.", l1.capacity_bytes)
        yield _gauge("lmcache_l1_chunks", "Chunks in L1.", l1.chunks)
        yield _gauge(
            "lmcache_l1_pinned_chunks",
            "L1 chunks pinned (promised to a pending load, or queued for a lower tier).",
            l1.pinned_chunks,
        )
        yield _gauge(
            "lmcache_pinned_lookups", "Lookups whose hits are pinned until loaded.", snap.pinned_lookups
        )
        yield _counter("lmcache_l1_evictions", "Chunks evicted from L1 by the eviction policy.", l1.evictions)
        yield _counter(
            "lmcache_l1_skipped_stores",
            "Stores skipped because L1 was full of pinned chunks.",
            l1.skipped_stores,
        )

        tiers, _ = tier_health(snap)
        healthy = GaugeMetricFamily(
            "lmcache_tier_healthy", "1 if the tier is up, 0 while it is failing.", labels=["tier"]
        )
        for tier, ok in tiers.items():
            healthy.add_metric([tier], 1.0 if ok else 0.0)
        yield healthy
        yield from self._tier_metrics(snap)
        yield from self._error_metrics(snap)

        lat = snap.latency
        yield _histogram("lmcache_lookup_duration_seconds", "Host time of lookup calls.", lat.lookup)
        yield _histogram(
            "lmcache_store_duration_seconds",
            "Host time of store calls that had chunks to save (on CUDA: until the copies are enqueued).",
            lat.store,
        )
        yield _histogram(
            "lmcache_retrieve_duration_seconds",
            "Host time of retrieve calls that had tokens to load, including promotion from lower tiers "
            "(on CUDA: until the copies are enqueued).",
            lat.retrieve,
        )

    @staticmethod
    def _tier_metrics(snap: EngineSnapshot) -> Iterator[Metric]:
        counters = [
            ("lmcache_tier_hits", "Chunks promoted from the tier into L1.", "hits"),
            ("lmcache_tier_read_bytes", "Bytes read from the tier into L1.", "read_bytes"),
            ("lmcache_tier_writes", "Chunks written to the tier (write-behind).", "writes"),
            ("lmcache_tier_write_bytes", "Bytes written to the tier (write-behind).", "write_bytes"),
            ("lmcache_tier_dropped_writes", "Write-behinds to the tier that were dropped.", "dropped_writes"),
            ("lmcache_tier_evictions", "Chunks evicted from the tier (where it evicts itself).", "evictions"),
        ]
        gauges = [
            ("lmcache_tier_used_bytes", "Bytes the tier holds (where it knows).", "used_bytes"),
            (
                "lmcache_tier_capacity_bytes",
                "Tier capacity in bytes (where it has one).",
                "capacity_bytes",
            ),
            ("lmcache_tier_chunks", "Chunks the tier holds (where it knows).", "chunks"),
        ]
        for specs, family in ((counters, CounterMetricFamily), (gauges, GaugeMetricFamily)):
            for name, doc, field in specs:
                fam = family(name, doc, labels=["tier"])
                for tier in snap.tiers:
                    value = getattr(tier, field)
                    if value is not None:
                        fam.add_metric([tier.name], value)
                yield fam

    @staticmethod
    def _error_metrics(snap: EngineSnapshot) -> Iterator[Metric]:
        errors: dict[str, int] = {
            "failed_retrieve": snap.counters.failed_retrieves,
            "skipped_store": snap.l1.skipped_stores,
        }
        if snap.tiers:
            errors["dropped_write"] = sum(t.dropped_writes for t in snap.tiers)
            errors["promotion_failure"] = snap.promotion_failures
        for tier in snap.tiers:
            errors[f"{tier.name}_corrupt_removed"] = tier.corrupt_chunks
            errors[f"{tier.name}_failure"] = tier.failures
        fam = CounterMetricFamily(
            "lmcache_errors", "Errors and degraded operations the cache absorbed, by kind.", labels=["kind"]
        )
        for kind, value in errors.items():
            fam.add_metric([kind], value)
        yield fam

    @staticmethod
    def _server_metrics(server: Any) -> Iterator[Metric]:
        info = _server_info(server)
        if info is None:
            return
        yield _gauge(
            "lmcache_server_connected_instances",
            "TRT-LLM ranks registered with the cache server.",
            len(info.instances),
        )
        yield _gauge(
            "lmcache_server_uptime_seconds", "Seconds since the cache server started.", info.uptime_s
        )
        yield _gauge(
            "lmcache_server_forward_waits",
            "Stores and loads of exported pools waiting for their worker's forward to end.",
            sum(i.forward_waits for i in info.instances),
        )
        yield _counter("lmcache_server_requests", "Requests the cache server received.", info.requests)
        yield _counter(
            "lmcache_server_errors", "Requests the cache server answered with an error.", info.errors
        )
        yield _counter(
            "lmcache_server_reaped_instances",
            "Clients dropped after going silent past --client-timeout-s.",
            info.reaped_instances,
        )
        refused = CounterMetricFamily(
            "lmcache_server_refusals",
            "Requests refused by an access check or a resource cap (docs/security.md), by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(info.refusals.items()):
            refused.add_metric([reason], count)
        yield refused
        yield from _gc_metrics(info.gc)


def _gc_metrics(stats: GcStats) -> Iterator[Metric]:
    """The garbage collector's pauses in the server's process, per generation (every request waits
    while one runs)."""
    collections = CounterMetricFamily(
        "lmcache_server_gc_collections", "Garbage collections in the cache server.", labels=["generation"]
    )
    paused = CounterMetricFamily(
        "lmcache_server_gc_pause_seconds",
        "Seconds the cache server's garbage collections paused it.",
        labels=["generation"],
    )
    longest = GaugeMetricFamily(
        "lmcache_server_gc_longest_pause_seconds",
        "The cache server's longest garbage-collection pause since start.",
        labels=["generation"],
    )
    for generation, (count, total, most) in enumerate(
        zip(stats.collections, stats.pause_s, stats.longest_pause_s, strict=True)
    ):
        collections.add_metric([str(generation)], count)
        paused.add_metric([str(generation)], total)
        longest.add_metric([str(generation)], most)
    yield collections
    yield paused
    yield longest
    yield _gauge(
        "lmcache_server_gc_frozen_objects",
        "Objects of the imported modules taken out of the garbage collector's walks at start-up.",
        stats.frozen_objects,
    )


def make_registry(engine: Any, server: Any = None) -> CollectorRegistry:
    """A private registry holding one :class:`EngineCollector` (the default registry is not used)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, server))
    return registry
