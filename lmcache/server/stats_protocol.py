"""The ``stats`` reply of the cache server: what ``lmcache stats``, ``/metrics`` and ``/health`` read
of it (re-exported by :mod:`lmcache.server.protocol`, whose ``Stats`` request it answers)."""

from __future__ import annotations

import msgspec

from lmcache.gc_pauses import GcStats
from lmcache.stats import EngineSnapshot

__all__ = ["InstanceStats", "StatsInfo"]


class InstanceStats(msgspec.Struct, kw_only=True):
    instance_id: int
    rank: int
    world_size: int
    model_name: str
    pool_kind: str
    pool_shape: list[int]
    dtype: str
    pid: int
    idle_s: float
    sharing: str = ""
    """How its pool is shared (:data:`lmcache.server.pool_descriptors.SHARING_MODES`)."""
    leased_slots: int = 0
    """Shared-L1 slots reserved ahead for its stores (counted in L1's ``used_bytes``)."""
    forward_waits: int = 0
    """Its stores and loads waiting for the worker's forward (a load: its stream's work) to end (an
    exported pool's, one per forward event): one that stays for the request's timeout is a worker
    that died mid-forward."""


class StatsInfo(msgspec.Struct, kw_only=True):
    server_id: str
    protocol_version: int
    uptime_s: float
    engine: EngineSnapshot
    """The engine's one stats snapshot (L1, counters, lower tiers, latencies): what /metrics and
    ``/health`` read in-process too."""
    pinned_lookups: int
    """Lookups whose pins the server holds for a later load (its pin table, all ranks)."""
    requests: int
    errors: int
    reaped_instances: int
    instances: list[InstanceStats] = []
    refusals: dict[str, int] = {}
    """Requests refused by a security check or a resource cap, by reason."""
    pool_sharing: str = "auto"
    """The server's pool-sharing policy (``--pool-sharing``)."""
    l1_memory: str = ""
    """What the server's L1 is made of (:attr:`lmcache.memory.SlabSource.memory`): ``private``, ``shm``,
    ``fd-cuda`` or ``fd-memfd``; empty from a server before this field."""
    gc: GcStats = msgspec.field(default_factory=GcStats)
    """The garbage collector's pauses in the server's process (every request waits while one runs)."""
