"""Lookups answered and pinned by the client through shared memory, with no round trip.

A lookup through the server costs a round trip, and a server that was idle answers
late (its thread sleeps; waking it costs more than the lookup: benchmarks/RESULTS.md, T5, D58). A
scheduler's lookup must also pin what it found, so that the load that follows finds it.

The server keeps an index of its L1's chunks in a shared-memory region (:class:`ClaimIndex`): one
64-bit fingerprint per chunk key (its digest, world size and rank) in an open-addressing table, and
beside it the chunk's slot, written by the server alone and mapped read-only by its clients
(``/dev/shm``, mode 0600, the server's user). Each registered instance gets a claim table of its
own (one count per index entry), which its client maps read-write. A lookup (:class:`ClaimView`)
finds each chunk's entry and claims it (adds one to its count, then checks the entry again), in
``lmcache._claims``; its hit is then the answer. The server never evicts a chunk whose entry a live
instance claims (:meth:`ClaimIndex.evictable`, L1's eviction guard). The client then sends its
lookup one-way with the entries it claimed: the server pins the hit as for any lookup and gives the
claims back (:meth:`ClaimIndex.release`). Between the claim and that pin nothing can evict the
chunks, so the hit the client promised stays loadable; a shared-L1 load copies from the claimed
slots before the server answers it.

The answer is the one a round trip would give, or the lookup takes the round trip:

* a shared-L1 store's chunks are marked as being stored before its reservation is answered
  (:meth:`ClaimIndex.storing`), so before the worker may report them done; a claim that reaches a
  mark asks the server, which reads reports before lookups;
* a client asks the server while its claimed lookups' pins and this one's would pass the instance's
  share of L1 (``--pin-share``), which the server may refuse (:meth:`Registrations.claim
  <lmcache.server.client_registrations.Registrations.claim>`);
* it asks when the server that made the index is gone (a restarted one knows nothing of it).

Only a server whose only tier is L1 offers the index (a lower tier could extend a hit the index
does not see), and only with the C extension built. A key the index cannot hold (no free entry near
its place) is a miss to clients: a recompute, never wrong KV. An instance's claims go with it
(retired, reaped); a claim table holding more than the instance's share of L1 is no longer honoured,
and the log says so.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server.protocol import ClaimRegions, RegionInfo, SlotInfo

try:
    from lmcache import _claims
except ImportError:  # built by setup.py; without it lookups take the round trip
    _claims = None

if TYPE_CHECKING:
    from lmcache.engine import CacheEngine
    from lmcache.memory import Slab
    from lmcache.shm_slabs import ShmSlabSource
    from lmcache.storage.cpu_store import CachedChunk

logger = init_logger(__name__)

__all__ = ["ClaimIndex", "ClaimView", "available", "index_entries"]

ENTRY_BYTES = 40
"""An index entry: its fingerprint, then (in a second array) its slot record: slab, offset, bytes, serial."""
CLAIM_BYTES = 4
"""A claim table's count of one entry."""
NOT_MARKED = (1 << 64) - 1
"""What ``lmcache._claims.mark`` returns for a chunk it did not mark."""
PENDING_S = 10.0
"""How long a store's mark stays unpublished at most (a store is reported done once its copies end:
far sooner)."""
MARKS_SHARE = 8
"""One client (a uid, a TCP address) may mark at most this fraction (1/8) of the index's entries as
being stored, however many instances it registers."""
MIN_ENTRIES = 1 << 16
MAX_ENTRIES = 1 << 23
MIN_CHUNK_BYTES_PER_TOKEN = 2048
"""What the index is sized for: chunks of at least this many bytes a token (a small model's rank)."""


def available() -> bool:
    """Whether this process can claim (``lmcache._claims`` is built)."""
    return _claims is not None


def index_entries(l1_bytes: int, chunk_size: int) -> int:
    """Entries for an L1 of ``l1_bytes``: four per chunk it can hold at the smallest chunk size, a
    power of two in [MIN_ENTRIES, MAX_ENTRIES] (a sparse table keeps probe sequences short)."""
    chunks = max(1, l1_bytes // max(1, chunk_size * MIN_CHUNK_BYTES_PER_TOKEN))
    entries = MIN_ENTRIES
    while entries < 4 * chunks and entries < MAX_ENTRIES:
        entries *= 2
    return entries


class ClaimIndex:
    """The server's side: the index of L1's keys (an observer of L1, under its lock), the instances'
    claim tables, and L1's eviction guard."""

    def __init__(self, source: ShmSlabSource, entries: int) -> None:
        if entries <= 0 or entries & (entries - 1):
            raise ValueError(f"entries must be a power of two, got {entries}")
        self._source = source
        self._slab = source.allocate(entries * ENTRY_BYTES)
        words = self._slab.tensor.numpy().view("<u8")
        self._table, self._slots = words[:entries], words[entries:]
        self._entries: dict[Hashable, tuple[int, int]] = {}
        """Indexed key -> (entry, fingerprint)."""
        self._pending: dict[int, tuple[int, float, Hashable]] = {}
        """Fingerprint of a chunk being stored -> (its entry, when marked, the client charged for it)."""
        self._marks: dict[Hashable, int] = {}
        """Marks each client holds: at most :attr:`max_marks`, however many instances it registers (so
        one client cannot fill the index and make every other tenant's claims miss)."""
        self.max_marks = max(1, entries // MARKS_SHARE)
        self._claims: dict[int, tuple[Slab, np.ndarray]] = {}
        self._honoured: tuple[np.ndarray, ...] = ()
        """The claim tables evictions consult (replaced whole: an eviction reads one snapshot)."""
        self._ignored: set[int] = set()
        self._warn = RateLimitedLog(logger)
        self._lock = threading.Lock()
        """Over the maps and the regions' writes: L1's calls (under its lock), store marks (handler
        threads) and the reaper's checks come from different threads."""

    @classmethod
    def for_engine(cls, engine: CacheEngine, shm_dir: str | None = None) -> ClaimIndex | None:
        """The index of ``engine``'s L1 (regions in ``shm_dir``), observing L1 and guarding its
        evictions from now on; None (lookups take the round trip) when the engine has lower tiers or
        no L1, the extension is not built, or the region cannot be created."""
        from lmcache.shm_slabs import SHM_DIR, ShmSlabError, ShmSlabSource

        if engine.tiers is not None or not engine.config.local_cpu:
            return None
        if _claims is None:
            logger.warning(
                "lmcache._claims is not built: lookups through this server take a round trip (reinstall "
                "lmcache where a C compiler and the Python headers are present)"
            )
            return None
        entries = index_entries(engine.l1.arena.capacity_bytes, engine.config.chunk_size)
        try:
            source = ShmSlabSource(shm_dir=shm_dir or SHM_DIR)
            index = cls(source, entries)
        except ShmSlabError as e:
            logger.warning("lookups will take a round trip (no claim index): %s", e)
            return None
        try:
            engine.l1.guard(index)
        except ValueError:  # another server of this engine guards it (tests): this one offers none
            index.close()
            return None
        engine.l1.observe(index)
        logger.info(
            "L1's claim index (%d entries) is in %s: clients look up and pin without a round trip",
            entries,
            os.path.join(source.shm_dir, index.info.name),
        )
        return index

    @property
    def info(self) -> RegionInfo:
        return RegionInfo(name=self._slab.name, nbytes=self._slab.nbytes)

    # ---- L1's observer and guard (under L1's lock) ---------------------------------------------

    def added(self, key: Hashable, chunk: CachedChunk) -> None:
        chunk_hash = getattr(key, "chunk_hash", None)
        if not isinstance(chunk_hash, bytes) or len(chunk_hash) < 8:
            return
        ref = chunk.buffer.ref
        # A chunk a device copy may still be filling has no slot for early copies (0 bytes).
        record = (ref.slab, ref.offset, ref.nbytes if chunk.ready is None else 0, chunk.serial)
        world_size, rank = key.world_size, key.rank  # type: ignore[attr-defined]
        with self._lock:
            entry, fp = _claims.add(self._table, self._slots, chunk_hash, world_size, rank, *record)  # type: ignore[union-attr]
            self._unmark(fp)
            if entry >= 0:
                self._entries[key] = (entry, fp)
                return
        self._warn.warning(
            "claims-unindexed",
            "a chunk could not enter L1's claim index (no free entry near its place, or a key of the "
            "same fingerprint): lookups miss it until it is stored again",
        )

    def storing(
        self, owner: Hashable, digests: bytes, digest_size: int, world_size: int, rank: int, now: float
    ) -> None:
        """The chunks ``digests`` names (of ``rank``) are being stored by a client (``owner``, charged
        for the marks): until they are published (or :data:`PENDING_S` passed) a claim that reaches one
        asks the server, which answers in the order it reads the reports. A save TRT-LLM was told has
        landed is then seen by every lookup after it, as without claims. Chunks indexed already are
        left as they are; past the client's :attr:`max_marks` none is marked (a claim may then miss
        them: a recompute)."""
        with self._lock:
            room = self.max_marks - self._marks.get(owner, 0)
            if room * digest_size < len(digests):
                self._warn.warning(
                    f"claims-marks-{owner}",
                    "client %s has %d stores' chunks in flight, the most one client may mark; lookups of "
                    "the rest may miss them until they are published",
                    owner,
                    self.max_marks,
                )
                digests = digests[: max(0, room) * digest_size]
            pairs = _claims.mark(self._table, self._slots, digests, digest_size, world_size, rank)  # type: ignore[union-attr]
            for fp, entry in np.frombuffer(pairs, dtype="<u8").reshape(-1, 2).tolist():
                if entry != NOT_MARKED:
                    self._pending[fp] = (entry, now, owner)
                    self._marks[owner] = self._marks.get(owner, 0) + 1

    def expire(self, now: float) -> None:
        """Drop the marks of stores not published within :data:`PENDING_S` (failed, or duplicates)."""
        with self._lock:
            stale = [fp for fp, (_, since, _) in self._pending.items() if now - since > PENDING_S]
            for fp in stale:
                entry = self._unmark(fp)
                _claims.remove(self._table, entry, fp)  # type: ignore[union-attr]

    def _unmark(self, fp: int) -> int:
        """Forget the mark of ``fp`` (the lock held); its entry, or -1 if it had none."""
        found = self._pending.pop(fp, None)
        if found is None:
            return -1
        entry, _, owner = found
        left = self._marks.get(owner, 0) - 1
        if left > 0:
            self._marks[owner] = left
        else:
            self._marks.pop(owner, None)
        return entry

    def removed(self, key: Hashable) -> None:
        with self._lock:
            found = self._entries.pop(key, None)
            if found is not None:
                _claims.remove(self._table, found[0], found[1])  # type: ignore[union-attr]

    def evictable(self, key: Hashable) -> bool:
        """False while a client claims ``key``'s entry; else the entry is gone from the index (L1
        then drops the key)."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return True
            return bool(_claims.evictable(self._table, found[0], found[1], self._honoured))  # type: ignore[union-attr]

    def kept(self, key: Hashable, chunk: CachedChunk) -> None:
        """``evictable`` let ``key``'s entry go but L1 keeps the chunk: index it again."""
        self.added(key, chunk)

    # ---- the instances' claim tables ------------------------------------------------------------

    def regions(self, owner: int) -> ClaimRegions:
        """The index and the claim table of ``owner`` (a registration, :attr:`Instance.registration`:
        an earlier registration of the same instance id has its own), created at its first call."""
        with self._lock:
            claims = self._claims.get(owner)
            if claims is None:
                slab = self._source.allocate(len(self._table) * CLAIM_BYTES)
                claims = (slab, slab.tensor.numpy().view("<u4"))
                self._claims[owner] = claims
                self._honour()
            slab = claims[0]
            return ClaimRegions(index=self.info, claims=RegionInfo(name=slab.name, nbytes=slab.nbytes))

    def release(self, owner: int, entries: bytes) -> int:
        """Give back ``owner``'s claims of ``entries`` (uint32 each; others are ignored); how many."""
        with self._lock:
            claims = self._claims.get(owner)
            if claims is None:
                return 0
            return int(_claims.unclaim(claims[1], entries))  # type: ignore[union-attr]

    def forget(self, owner: int) -> None:
        """The registration is gone: its claims no longer hold anything, its table's name goes."""
        with self._lock:
            if self._claims.pop(owner, None) is not None:
                self._ignored.discard(owner)
                self._honour()

    def check_shares(
        self, chunk_bytes: dict[int, int], share_bytes: int, instance_ids: dict[int, int] | None = None
    ) -> None:
        """Stop honouring the claim tables that hold more than ``share_bytes`` of L1 (``chunk_bytes``:
        each owner's chunk size in bytes; ``instance_ids``: the instance each owner registered, for the
        warning), as a lookup's pins over that share are refused."""
        names = instance_ids or {}
        with self._lock:
            over = []
            for owner, (_, counts) in list(self._claims.items()):
                claimed = int(np.count_nonzero(counts)) * chunk_bytes.get(owner, 0)
                if claimed > share_bytes and owner not in self._ignored:
                    over.append(owner)
                    self._warn.warning(
                        f"claims-{owner}",
                        "instance %d claims %d bytes of L1, over its share (%d, --pin-share): its claims are "
                        "ignored from now on and its lookups may promise chunks that go",
                        names.get(owner, owner),
                        claimed,
                        share_bytes,
                    )
            if over:
                self._ignored.update(over)
                self._honour()

    def _honour(self) -> None:
        self._honoured = tuple(c for iid, (_, c) in self._claims.items() if iid not in self._ignored)

    def close(self) -> None:
        """Remove the regions' names (mappings stay valid until dropped)."""
        with self._lock:
            self._claims.clear()
            self._honoured = ()
            self._source.close()


class ClaimView:
    """A client's mapping of the server's index (read-only) and of one instance's claim table."""

    def __init__(
        self, regions: ClaimRegions, words: np.ndarray, counts: np.ndarray, server_alive: Callable[[], bool]
    ) -> None:
        self.regions = regions
        self._server_alive = server_alive
        self._table, self._slots = words[: len(counts)], words[len(counts) :]
        self._slot_words = memoryview(self._slots).cast("B").cast("Q")
        """The slots as plain words: read per claimed chunk without numpy's dispatch."""
        self._counts = counts

    @classmethod
    def map(cls, regions: ClaimRegions, shm_dir: str | None = None) -> ClaimView | None:
        """The server's regions, after the checks of :func:`lmcache.shm_slabs.open_region`; None (lookups
        take the round trip) if they cannot be mapped here: another user or host, or no extension."""
        from lmcache.shm_slabs import SHM_DIR, ShmSlabError, ShmSlabInfo, creator_check, open_region

        index, claims = regions.index, regions.claims
        if _claims is None:
            logger.info("lmcache._claims is not built here: lookups through the server take a round trip")
            return None
        if claims.nbytes % CLAIM_BYTES:
            return None
        entries = claims.nbytes // CLAIM_BYTES
        if entries & (entries - 1) or index.nbytes != entries * ENTRY_BYTES:
            logger.info("lookups will take a round trip: the server's claim regions do not match")
            return None
        where = shm_dir or SHM_DIR
        try:
            table = open_region(ShmSlabInfo(0, index.name, index.nbytes), writable=False, shm_dir=where)
            counts = open_region(ShmSlabInfo(0, claims.name, claims.nbytes), writable=True, shm_dir=where)
        except ShmSlabError as e:
            logger.info("lookups will take a round trip: %s", e)
            return None
        alive = creator_check(index.name)
        return cls(regions, np.frombuffer(table, dtype="<u8"), np.frombuffer(counts, dtype="<u4"), alive)

    def claim(
        self, digests: bytes, digest_size: int, world_size: int, ranks: Sequence[int]
    ) -> tuple[int, bytes, bool]:
        """Claim the leading chunks of ``digests`` found for every rank in ``ranks``: how many, the
        claimed entries (uint32 each, chunk by chunk) to send with the lookup, and whether only the
        server can answer: the claim stopped at a chunk being stored, or the server that made the
        index is gone (a restarted one knows nothing of it, and the client registers again)."""
        if not self._server_alive():  # a server gone: its index says nothing now
            return 0, b"", True
        return _claims.claim(self._table, self._slots, self._counts, digests, digest_size, world_size, ranks)  # type: ignore[union-attr]

    def slots(self, entries: bytes, world_size: int, rank: int) -> list[SlotInfo]:
        """The slots of ``rank``'s chunks among claimed ``entries`` (as :meth:`claim` returned them),
        in prompt order, up to the first without one (a device copy may still have been filling it)."""
        words = self._slot_words
        slots = []
        for entry in memoryview(entries).cast("I")[rank::world_size]:
            slab, offset, nbytes, serial = words[4 * entry : 4 * entry + 4]
            if not nbytes:
                break
            slots.append(SlotInfo(slab, offset, nbytes, serial))
        return slots

    def unclaim(self, entries: bytes) -> None:
        """Give claims back (the lookup that holds them will not reach the server)."""
        _claims.unclaim(self._counts, entries)  # type: ignore[union-attr]
