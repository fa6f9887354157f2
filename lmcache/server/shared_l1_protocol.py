"""Reply values of the shared-L1 ops (``store_reserve``, ``load``) and the server's other shared
regions; re-exported by :mod:`lmcache.server.protocol`, where the requests are."""

from __future__ import annotations

import msgspec


class SlabInfo(msgspec.Struct, kw_only=True):
    """An L1 slab in shared memory: ``/dev/shm/<name>`` of ``nbytes`` bytes, called ``id`` in slot refs;
    of another ``kind`` (``cuda``, ``memfd``), passed by descriptor on the server's ``channel`` socket."""

    id: int
    name: str
    nbytes: int
    kind: str = "shm"
    channel: str = ""


class SlabList(msgspec.Struct, kw_only=True):
    """Reply to ``l1_slabs``: the server's L1 slabs now (later ones are announced by registration and
    transfer replies), and the server's id and ``--pool-sharing`` policy. ``more``: the server is
    still creating its L1 ahead of need, so asking again soon finds more."""

    server_id: str
    pool_sharing: str
    slabs: list[SlabInfo] = []
    more: bool = False


class SlotInfo(msgspec.Struct, array_like=True):
    """An L1 slot: ``nbytes`` bytes at ``offset`` in slab ``slab``; for a cached chunk, ``serial``
    names its filling (equal serials, same bytes; 0 for a slot to fill)."""

    slab: int
    offset: int
    nbytes: int
    serial: int = 0


class LookupSlots(msgspec.Struct, kw_only=True):
    """Reply to a lookup that asked for ``slots``: the hit, and the slots of the chunks it pinned for
    the instance's rank, in prompt order (empty for an instance not in the shared-L1 mode). A worker
    may copy from them before its ``load`` is answered; that reply names the slots to use."""

    hit: int
    slots: list[SlotInfo] = []


class StoreChunk(msgspec.Struct, array_like=True):
    """One chunk of a reserved store: rows ``block_ids[first_block : first_block + rows]`` go to
    ``slot``; ``slot`` None: already cached, skipped."""

    first_block: int
    rows: int
    slot: SlotInfo | None


class LoadChunk(msgspec.Struct, array_like=True):
    """One chunk of a load: rows ``[skip, stop)`` of ``slot`` (of ``rows`` pool rows) go to
    ``block_ids[first_block + skip : first_block + stop]``."""

    first_block: int
    rows: int
    skip: int
    stop: int
    slot: SlotInfo


class LeasedSlot(msgspec.Struct, array_like=True):
    """A slot of the instance's lease: room for one full chunk, filled by the worker before it knows
    whether the chunk is cached, and named by ``id`` in ``store_done``."""

    id: int
    slot: SlotInfo


class StoreSlots(msgspec.Struct, kw_only=True):
    """Reply to ``store_reserve``: copy, then send ``store_done`` with ``ticket`` (no chunk reserved:
    ``ticket`` 0, nothing to report). ``tokens``: what the ticket publishes; ``leased``: slots added
    to the instance's lease."""

    ticket: int
    chunks: list[StoreChunk] = []
    tokens: int = 0
    leased: list[LeasedSlot] = []
    slabs: list[SlabInfo] = []
    """The slabs the chunks' and leased slots lie in: map those not mapped yet before copying."""
    forget: list[int] = []
    """Ids of slabs the instance was told of that are gone: drop their mappings."""
    ahead: list[SlabInfo] = []
    """Slabs the instance was not told of yet: later slots will lie in them, map them ahead."""


class LoadSlots(msgspec.Struct, kw_only=True):
    """Reply to ``load``: copy, then send ``load_done`` with ``ticket`` (no chunk: ``ticket`` 0).
    ``loaded`` is the tokens the chunks cover from ``start``."""

    ticket: int
    loaded: int
    chunks: list[LoadChunk] = []
    slabs: list[SlabInfo] = []
    forget: list[int] = []
    ahead: list[SlabInfo] = []


class RegionInfo(msgspec.Struct, kw_only=True):
    """A shared-memory region of the server: ``/dev/shm/<name>``, ``nbytes`` bytes."""

    name: str
    nbytes: int


class ClaimRegions(msgspec.Struct, kw_only=True):
    """The server's claim index and one instance's claim table (:mod:`lmcache.server.claims`), with
    what the instance's pinned lookups may hold in all (``--pin-share``) and a chunk's bytes."""

    index: RegionInfo
    claims: RegionInfo
    share_bytes: int = 0
    chunk_bytes: int = 0
