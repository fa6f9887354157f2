"""The disk :class:`~lmcache.storage.lower_tier.LowerTier`: a :class:`DiskStore` with fail-soft writes
and parallel reads.

A write error that means the whole disk is unusable for now (full, read-only, no permission, bad
device: :data:`~lmcache.storage.disk_store.DEGRADING_ERRNOS`) starts a back-off: writes are dropped
(the chunks stay in L1) until it has passed, and the next write is the probe. A directory that
cannot be written is found at start (a probe file): the tier starts down, ``/health`` says so, and
L1 serves as usual. Reads go straight into L1 slots on ``read_threads`` threads (``readinto`` and
the checksum release the GIL).

The index is rebuilt from the directory in the background (:meth:`DiskStore.start_scan`), so the
engine or server starts at once: until the scan ends, a chunk not indexed yet is a miss, and
:meth:`DiskTier.status` says ``scanning (N files indexed so far)``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import wait
from pathlib import Path

from lmcache.backoff import Backoff
from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.disk_store import DEGRADING_ERRNOS, DiskStore
from lmcache.storage.fetch_threads import FetchThreads
from lmcache.storage.lower_tier import (
    ChecksumMemo,
    FetchStatus,
    LowerTier,
    Sink,
    TierStatus,
    WriteItem,
    WriteOutcome,
    payload_view,
    submit_or_run,
)

logger = init_logger(__name__)

__all__ = ["DiskTier"]


def _unwritable(root: Path) -> OSError | None:
    """Why no file can be created in ``root`` (created if missing), or None when one can."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".lmcache-write-probe-", dir=root)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc
    return None


class DiskTier(LowerTier):
    """L2 on a local disk (``name`` ``disk``)."""

    name = "disk"

    def __init__(self, store: DiskStore, *, backoff: Backoff, read_threads: int = 4) -> None:
        self.store = store
        self.where = str(store.root)
        self.backoff = backoff
        self._readers = FetchThreads(max(1, read_threads), "lmcache-disk-read")  # daemons: see the class
        self._warn = RateLimitedLog(logger)
        self._closed = False
        self._lock = threading.Lock()
        # A directory the store refused (another user's, unmarked) is not even probed.
        problem = store.problem or _unwritable(store.root)
        if problem is not None:
            self._failed(problem)

    @classmethod
    def from_config(cls, config: LMCacheEngineConfig) -> DiskTier | None:
        """The tier ``local_disk`` asks for, or None when it is unset."""
        if config.local_disk is None:
            return None
        store = DiskStore(
            config.local_disk,
            config.max_local_disk_bytes,
            config.cache_policy,
            fsync=config.disk_fsync,
            verify_on_scan=config.disk_verify_on_startup,
            scan=False,
        )
        store.start_scan()
        backoff = Backoff(config.tier_retry_initial_s, config.tier_retry_max_s)
        return cls(store, backoff=backoff, read_threads=config.tier_read_threads)

    def wait_scanned(self, timeout: float | None = None) -> bool:
        """Wait until the store's start-up scan has ended; False if it still runs after ``timeout``."""
        return self.store.wait_scanned(timeout)

    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        return self.store.lookup(ns, key) is not None

    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.store.lookup(ns, key) is not None for key in keys]

    def accepts_writes(self) -> bool:
        return not self._closed and self.backoff.ready()

    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        written = written_bytes = dropped = 0
        for item in items:
            if not self.backoff.ready():
                dropped += 1
                continue
            try:
                item.chunk.wait_ready_on_host()
                payload = payload_view(item.chunk)
                known = checksums.get(item.chunk)
                checksum = self.store.write(item.ns, item.key, item.chunk.num_tokens, payload, known)
            except OSError as exc:
                dropped += 1
                if exc.errno in DEGRADING_ERRNOS:
                    self._failed(exc)
                else:
                    self._warn.warning("disk-write", "disk tier: write of a chunk failed (%s)", exc)
                continue
            if checksum is None:  # larger than the tier, or the rest is held by writes in flight
                dropped += 1
                continue
            checksums.put(item.chunk, checksum)
            written += 1
            written_bytes += payload.nbytes
            if self.backoff.succeeded():
                logger.info("disk tier %s is writable again", self.store.root)
        return WriteOutcome(written, written_bytes, dropped)

    def _failed(self, exc: OSError) -> None:
        delay = self.backoff.failed()
        self._warn.warning(
            "disk-down",
            "disk tier %s cannot be written (%s); continuing with L1 only for now, retrying in %.1fs "
            "(with backoff)",
            self.store.root,
            exc,
            delay,
        )

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        """Slots are asked of ``sink`` in this thread, in order; the reads then run in parallel."""
        statuses: list[FetchStatus] = []
        reads = []
        for i, key in enumerate(keys):
            entry = self.store.lookup(ns, key)
            out = None if entry is None else sink(i, entry.payload_len, entry.num_tokens)
            if entry is None:
                statuses.append(FetchStatus.MISSING)
            elif out is None:
                statuses.append(FetchStatus.SKIPPED)
            else:
                statuses.append(FetchStatus.OK)
                reads.append((i, key, entry, out))
        # Once closed, the pool takes no more reads: they run in this thread.
        futures = [
            (i, submit_or_run(self._readers, self.store.read_into, ns, key, entry, out))
            for i, key, entry, out in reads[1:]
        ]
        try:
            if reads:
                i, key, entry, out = reads[0]
                if not self.store.read_into(ns, key, entry, out):
                    statuses[i] = FetchStatus.CORRUPT
        finally:
            wait([future for _, future in futures])  # even on an error: no read fills a slot after this
        for i, future in futures:
            if not future.result():
                statuses[i] = FetchStatus.CORRUPT
        return statuses

    def status(self) -> TierStatus:
        state = self.backoff.state()
        reason = None
        if self._closed:
            reason = "closed"
        elif state.failing:
            reason = f"writes failing, next attempt in {state.retry_in_s:.1f}s"
        store = self.store
        progress = store.scan_progress
        return TierStatus(
            healthy=reason is None,
            reason=reason,
            failures=state.failures,
            corrupt_chunks=store.corrupt_removed,
            used_bytes=store.used_bytes,
            capacity_bytes=store.capacity_bytes,
            chunks=len(store),
            evictions=store.evictions,
            state=None if progress is None else f"scanning ({progress} files indexed so far)",
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._readers.shutdown()
        self.store.close()
