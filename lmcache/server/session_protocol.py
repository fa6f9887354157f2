"""The replies of the session ops (``register``, ``ping``, ``heartbeat``): what a client learns of
the server and of its registration (re-exported by :mod:`lmcache.server.protocol`)."""

from __future__ import annotations

import msgspec

from lmcache.server.shared_l1_protocol import ClaimRegions, RegionInfo, SlabInfo

__all__ = ["ChunkHashing", "HeartbeatInfo", "PingInfo", "RegisterInfo"]


class ChunkHashing(msgspec.Struct, kw_only=True):
    """How the server keys an instance's chunks: ``lmcache.keys.TokenHasher(chunk_size, algorithm,
    model_name, layout_signature)`` computes the hashes a ``lookup_hashes`` carries."""

    algorithm: str
    layout_signature: bytes


class RegisterInfo(msgspec.Struct, kw_only=True):
    instance_id: int
    chunk_size: int
    num_blocks: int
    server_id: str
    """Random per server start: a change tells a client the server restarted."""
    refreshed: bool = False
    """True when the same registration already existed (only its liveness was refreshed)."""
    hashing: ChunkHashing | None = None
    """Set when the server takes ``lookup_hashes`` for this instance; None when lookups must carry
    tokens (with ``save_unfull_chunk`` it probes partial chunks, which needs their tokens)."""
    cap: bytes = b""
    """The instance's capability: every later request naming the instance must carry it."""
    sharing: str = ""
    """How the pool is shared (:data:`SHARING_MODES`)."""
    pool_sharing: str = "auto"
    """The server's policy (``--pool-sharing``): ``auto``, or the mode it forces (``export``,
    ``shared-l1``)."""
    presence: RegionInfo | None = None
    """The counts of the chunks in the server's L1 (:mod:`lmcache.server.presence`); None when the
    server has lower tiers."""
    claims: ClaimRegions | None = None
    """Where the client claims chunks with no round trip (:mod:`lmcache.server.claims`); None: ask."""
    forward_events: int = 0
    """How many of the pool's forward events the server opened (a store may name those)."""
    slabs_ahead: list[SlabInfo] = []
    """Shared-L1 mode: the server's L1 slabs, for the worker to map and page-lock ahead of its copies."""
    reap_after_s: float = 0.0
    """The server retires the instance after this long without a request or heartbeat naming it (0:
    never for silence alone: it watches the process, or does not reap)."""


class PingInfo(msgspec.Struct, kw_only=True):
    server_id: str
    protocol_version: int
    chunk_size: int
    uptime_s: float
    version: str = ""
    pool_sharing: str = "auto"
    """As :attr:`RegisterInfo.pool_sharing`: a client in ``auto`` registers in the mode a server forces."""


class HeartbeatInfo(msgspec.Struct, kw_only=True):
    server_id: str
    unknown: list[int] = []
    """Instance ids the server does not know (restarted or reaped): re-register them."""
