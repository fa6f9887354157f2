"""Which chunks the cache server may hold, readable by its clients without asking it.

A lookup through the server costs a round trip, and a server that has been idle for a few
milliseconds answers its first request late (its thread sleeps; waking it takes longer than the
lookup). A prompt the server holds nothing of (every request at 0 % hits) should not pay for that.

The server counts the chunks visible in its L1 per bucket of chunk hashes (:func:`bucket`) in a
shared-memory region like its L1 slabs (``/dev/shm``, mode 0600, the server's user, removed at
exit): :class:`PresenceCounts` adds one when a chunk is published and takes one away when it goes.
A client of the same user maps the region read-only (:class:`PresenceView`): a zero count for a
prompt's first chunk means the server holds no chunk of that prompt (a prompt's chunks are chained
from its first), and the lookup is a miss without a round trip. A non-zero count only says "ask":
buckets are shared. Counts are read without a lock; a chunk published during the read may be
missed, which costs a recompute, never wrong KV. Only a server whose only tier is L1 offers the
region: chunks on disk or in Redis were never counted.

A shared-L1 save is published by a one-way report, and TRT-LLM learns that the save landed once the
report is sent, possibly before the server has read it: the counts do not show its chunks yet. So
the view also remembers the first chunks this process reported published (:meth:`PresenceView.published`)
and says "ask" for them; the server serves a request sent after a report after the report
(:mod:`lmcache.server.dispatch`), so that lookup finds them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from lmcache.logging import init_logger
from lmcache.server.protocol import RegionInfo

if TYPE_CHECKING:
    from lmcache.engine import CacheEngine
    from lmcache.shm_slabs import ShmSlabSource
    from lmcache.storage.cpu_store import CachedChunk

logger = init_logger(__name__)

SHM_DIR = "/dev/shm"
"""Where the region lives (:data:`lmcache.shm_slabs.SHM_DIR`; that module loads torch, this one may not:
``lmcache stats`` imports the client)."""

BUCKETS = 1 << 20
"""Counters in the region (4 MiB of uint32): a few per chunk even for a large L1 of small chunks."""

RECENT_PUBLICATIONS = 4096
"""First chunks a view remembers this process reported published (the oldest forgotten first): far more
than the saves whose reports can be in flight at once."""

DIGEST_KEY = 16
"""Bytes of a chunk hash that name it among the remembered ones (every hash's digest has at least 16)."""


def bucket(chunk_hash: bytes, buckets: int) -> int:
    """The counter of a chunk hash: its first 8 bytes, little-endian, modulo ``buckets`` (a power of
    two). Chunk hashes are uniform, so the low bits spread the chunks evenly."""
    return int.from_bytes(chunk_hash[:8], "little") & (buckets - 1)


class PresenceCounts:
    """The server's side: one counter per bucket in a shared region; an observer of its L1
    (:meth:`lmcache.storage.cpu_store.CpuStore.observe`), called under the store's lock."""

    def __init__(self, source: ShmSlabSource, buckets: int = BUCKETS) -> None:
        if buckets <= 0 or buckets & (buckets - 1):
            raise ValueError(f"buckets must be a power of two, got {buckets}")
        self._source = source
        self._slab = source.allocate(buckets * 4)
        self._counts = self._slab.tensor.numpy().view("<u4")
        self.buckets = buckets

    @classmethod
    def for_engine(cls, engine: CacheEngine, shm_dir: str = SHM_DIR) -> PresenceCounts | None:
        """Counts of ``engine``'s L1, observing it from now on; None when the engine has lower tiers
        or no L1, or the region cannot be created (lookups then always ask the server)."""
        from lmcache.shm_slabs import ShmSlabError, ShmSlabSource

        if engine.tiers is not None or not engine.config.local_cpu:
            logger.info(
                "no presence counts (lower tiers hold chunks L1 never counted): clients ask about each prompt"
            )
            return None
        try:
            counts = cls(ShmSlabSource(shm_dir=shm_dir))
        except ShmSlabError as e:
            logger.warning("clients will ask about every prompt (no presence region): %s", e)
            return None
        engine.l1.observe(counts)
        logger.info(
            "L1's presence counts are in %s: clients of this user find misses there, without a round trip",
            os.path.join(shm_dir, counts.info.name),
        )
        return counts

    def close(self) -> None:
        """Remove the region's name (mappings stay valid until dropped)."""
        self._source.close()

    @property
    def info(self) -> RegionInfo:
        """What a client maps (:meth:`PresenceView.map`)."""
        return RegionInfo(name=self._slab.name, nbytes=self._slab.nbytes)

    def added(self, key: Hashable, chunk: CachedChunk | None = None) -> None:
        chunk_hash = getattr(key, "chunk_hash", None)
        if isinstance(chunk_hash, bytes):
            self._counts[bucket(chunk_hash, self.buckets)] += 1

    def removed(self, key: Hashable) -> None:
        chunk_hash = getattr(key, "chunk_hash", None)
        if isinstance(chunk_hash, bytes):
            index = bucket(chunk_hash, self.buckets)
            if self._counts[index]:  # never below zero: a count there would hide a chunk added later
                self._counts[index] -= 1

    def count(self, chunk_hash: bytes) -> int:
        return int(self._counts[bucket(chunk_hash, self.buckets)])


class PresenceView:
    """A client's read-only mapping of a server's counts."""

    def __init__(self, info: RegionInfo, counts: np.ndarray) -> None:
        self.info = info
        self._counts = counts
        self._lock = threading.Lock()
        self._published: OrderedDict[bytes, None] = OrderedDict()
        """First chunks this process reported published, which the counts may not show yet."""

    @classmethod
    def map(cls, info: RegionInfo, shm_dir: str = SHM_DIR) -> PresenceView | None:
        """The server's region, after the checks of :func:`lmcache.shm_slabs.open_region`; None (every
        lookup then asks the server) if it cannot be mapped, e.g. from another user or host."""
        from lmcache.shm_slabs import ShmSlabError, ShmSlabInfo, open_region  # loads torch: not at import

        nbytes = info.nbytes
        if nbytes <= 0 or nbytes % 4 or (nbytes // 4) & (nbytes // 4 - 1):
            logger.warning("the server's presence region is %d bytes, not a power of two of counters", nbytes)
            return None
        try:
            mapping = open_region(ShmSlabInfo(0, info.name, nbytes), writable=False, shm_dir=shm_dir)
        except ShmSlabError as e:
            logger.info("lookups will ask the server about every prompt: %s", e)
            return None
        return cls(info, np.frombuffer(mapping, dtype="<u4"))

    def published(self, chunk_hash: bytes) -> None:
        """This process reported the chunk ``chunk_hash`` published, one-way: :meth:`may_hold` says so
        even before the server has read the report."""
        with self._lock:
            self._published[chunk_hash[:DIGEST_KEY]] = None
            self._published.move_to_end(chunk_hash[:DIGEST_KEY])
            if len(self._published) > RECENT_PUBLICATIONS:
                self._published.popitem(last=False)

    def may_hold(self, chunk_hash: bytes) -> bool:
        """False when the server surely holds no chunk under ``chunk_hash``."""
        if self._counts[bucket(chunk_hash, len(self._counts))]:
            return True
        with self._lock:
            return chunk_hash[:DIGEST_KEY] in self._published
