"""The reads of a promotion from the lower tiers into L1, and the bound on how long it waits for them.

:class:`~lmcache.storage.tiers.TierManager` promotes a window of positions at a time: it pins what L1
has, and each tier's other chunks (its :class:`Cell` list) are read by that tier's own fetch threads
(:class:`TierReads`) straight into L1 slots reserved as their headers check out. The promoting caller
(a lookup inside TRT-LLM's scheduler, say) only waits for those reads, until the promotion's deadline
(``lookup_timeout_ms`` after its first read in the engine's configuration): a hung disk (an NFS mount
that stopped answering) or a Redis that accepts but never replies costs one bounded wait, never the
scheduler.

A tier's read still running at the deadline is *late*: the caller gives its cells up (they are misses:
the prefix ends before the first of them), logs one warning naming the tier and the bound, and the read
owns its cells from then on: when it ends, it publishes (unpinned, an ordinary evictable L1 chunk) each
chunk it read and verified, so a tier slower than the bound still promotes and the next lookup finds
those chunks in L1, and gives back every other slot it reserved. Slots a read may still write into are
never given back before it ends, so a read that never ends keeps its slots (at most one window's chunks
of one tier). The fetch threads are daemon threads (:class:`FetchThreads`): a read hung on a dead NFS
mount never holds up the process's exit. Who owns a read's cells is decided once, under the read's
lock: the read ending first hands them to the caller, the caller giving up first hands them to the
read. While a tier has a late read outstanding, promotions do not read from it (its chunks are misses
at once), so a hung tier neither stalls every lookup by the bound nor piles up threads and slots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CachedChunk, CpuStore
from lmcache.storage.fetch_threads import FetchThreads
from lmcache.storage.lower_tier import FailSoft, FetchStatus, Sink, payload_view, submit_or_run

logger = init_logger(__name__)

__all__ = ["FETCH_THREADS", "IN_L1", "Cell", "TierRead", "TierReads", "undo"]

FETCH_THREADS = 4
"""Fetch threads per tier: promotions of this many callers read from one tier at once."""

IN_L1 = -1
"""``where`` of a chunk already in L1; a tier's index otherwise, None when no tier has it."""


@dataclass(eq=False)
class Cell:
    """One key being promoted: where it comes from, the L1 slot reserved for it, whether it is filled."""

    key: ChunkKey
    source: int
    tokens: int
    """The tokens the chunk its key names holds: a tier's chunk of another length is refused."""
    chunk: CachedChunk | None = None
    ok: bool = False
    settled: bool = False
    """Published, given back, handed to the caller's pins or to a late read: nothing for the
    promoting caller to undo."""


def undo(l1: CpuStore, rows: list[list[Cell]]) -> None:
    """Give back what a failed promotion window still holds: pins of chunks L1 had, unpublished slots."""
    for cell in (cell for row in rows for cell in row if not cell.settled):
        if cell.source == IN_L1:
            l1.unpin(cell.key)
        elif cell.chunk is not None:
            l1.abort(cell.key)
        cell.settled = True


@dataclass(eq=False)
class TierRead:
    """One tier's cells of a promotion window, read on that tier's fetch threads. At most one of
    ``finished`` (the read ended in time: the caller owns the cells) and ``abandoned`` (the caller gave
    up: the read owns them) is ever set, under ``lock``."""

    index: int
    cells: list[Cell]
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False
    abandoned: bool = False
    future: Future[None] | None = None


class TierReads:
    """Each lower tier's fetch threads, and the bound (``timeout_s``; None: none) on a promotion's wait
    for them."""

    def __init__(self, l1: CpuStore, calls: Sequence[FailSoft], timeout_s: float | None) -> None:
        self.l1 = l1
        self.calls = tuple(calls)
        self.timeout_s = timeout_s
        self._pools = [FetchThreads(FETCH_THREADS, f"lmcache-{call.tier.name}-fetch") for call in self.calls]
        self._late = [0] * len(self.calls)
        self._lock = threading.Lock()
        self._warn = RateLimitedLog(logger)

    def deadline(self) -> float | None:
        """The deadline of a promotion whose reads start now."""
        return None if self.timeout_s is None else time.monotonic() + self.timeout_s

    def late(self, index: int) -> bool:
        """Whether tier ``index`` has a read outstanding that a promotion gave up on."""
        with self._lock:
            return self._late[index] > 0

    def start(self, ns: Namespace, index: int, cells: list[Cell], deadline: float | None) -> TierRead | None:
        """Read ``cells`` from tier ``index`` on its fetch threads (in this thread once closed); None,
        reading nothing, past ``deadline`` or while the tier has a late read outstanding."""
        if self.late(index):
            return None
        if deadline is not None and time.monotonic() >= deadline:
            tier = self.calls[index].tier
            self._warn.warning(
                "promotion-out-of-time",
                "a promotion's reads took its whole bound of %.0f ms (lookup_timeout_ms); its chunks "
                "still in the %s tier (%s) are misses",
                (self.timeout_s or 0.0) * 1000,
                tier.name,
                tier.where,
            )
            return None
        read = TierRead(index, cells)
        read.future = submit_or_run(self._pools[index], self._run, ns, read)
        return read

    def wait(self, reads: Sequence[TierRead], deadline: float | None) -> None:
        """Wait for ``reads`` until ``deadline``, then give up on those still running (with a warning)."""
        futures = [read.future for read in reads if read.future is not None]
        if futures:
            wait(futures, None if deadline is None else max(0.0, deadline - time.monotonic()))
        for read in self.give_up(reads):
            tier = self.calls[read.index].tier
            self._warn.warning(
                f"{tier.name}-late-read",
                "the %s tier (%s) did not answer a promotion's reads within %.0f ms (lookup_timeout_ms): "
                "its chunks are misses, and it is not read from again until those reads end",
                tier.name,
                tier.where,
                (self.timeout_s or 0.0) * 1000,
            )

    def give_up(self, reads: Sequence[TierRead]) -> list[TierRead]:
        """Hand every read of ``reads`` that has not finished its cells (they become the read's to publish
        or give back, and are settled for the caller); returns those. Idempotent."""
        given_up = []
        for read in reads:
            with read.lock:
                if read.finished or read.abandoned:
                    continue
                read.abandoned = True
                for cell in read.cells:
                    cell.settled = True
                with self._lock:
                    self._late[read.index] += 1
            given_up.append(read)
            if read.future is not None and read.future.cancel():  # never started: reserved nothing
                self._ended_late(read.index)
        return given_up

    def close(self) -> None:
        """No new fetch threads; reads started from now on run in their caller's thread."""
        for pool in self._pools:
            pool.shutdown()

    def _run(self, ns: Namespace, read: TierRead) -> None:
        statuses: list[FetchStatus] | None = None
        try:
            # A fetch that raises is a miss for its cells: the caller drops the slots they reserved.
            statuses = self.calls[read.index].fetch_into(ns, [c.key for c in read.cells], self._sink(read))
        finally:
            with read.lock:
                late = read.abandoned
                if not late:
                    read.finished = True
                    if statuses is not None:
                        self._apply(read, statuses)
            if late:  # the caller gave these cells up: they are this read's to publish or give back
                try:
                    self._settle_late(read, statuses)
                finally:
                    self._ended_late(read.index)

    def _settle_late(self, read: TierRead, statuses: list[FetchStatus] | None) -> None:
        """Publish, unpinned, each chunk a late read verified (its slot was reserved under its key by
        this read's sink, and nobody else publishes or reuses a reserved slot, so it holds exactly the
        verified bytes); give back every other slot. A cell that fails is logged, never skips the rest."""
        ok = [False] * len(read.cells) if statuses is None else [s is FetchStatus.OK for s in statuses]
        for cell, verified in zip(read.cells, ok, strict=True):
            if cell.chunk is None:
                continue
            try:
                if verified:
                    self.l1.commit(cell.key)
                else:
                    self.l1.abort(cell.key)
            except Exception as exc:  # noqa: BLE001 - one cell's fault, never the other cells' or the tier's
                tier = self.calls[read.index].tier
                self._warn.warning(
                    f"{tier.name}-late-settle",
                    "ending a late read of the %s tier (%s): settling %s in L1 failed (%r)",
                    tier.name,
                    tier.where,
                    cell.key.hex(),
                    exc,
                )

    def _sink(self, read: TierRead) -> Sink:
        tier = self.calls[read.index].tier

        def sink(i: int, payload_len: int, num_tokens: int) -> memoryview | None:
            cell = read.cells[i]
            if read.abandoned:  # given up: reserve nothing more (a slot reserved anyway is given back)
                return None
            if num_tokens != cell.tokens:
                self._warn.warning(
                    f"{tier.name}-wrong-length",
                    "the %s tier (%s) holds %s with %d tokens where its key names %d: not promoted (a "
                    "corrupt or foreign chunk)",
                    tier.name,
                    tier.where,
                    cell.key.hex(),
                    num_tokens,
                    cell.tokens,
                )
                return None
            cell.chunk = self.l1.reserve(cell.key, payload_len, num_tokens)
            return None if cell.chunk is None else payload_view(cell.chunk)

        return sink

    def _apply(self, read: TierRead, statuses: list[FetchStatus]) -> None:
        for cell, status in zip(read.cells, statuses, strict=True):
            cell.ok = status is FetchStatus.OK
            if status is FetchStatus.SKIPPED and cell.chunk is None and self.l1.pin(cell.key):
                cell.source = IN_L1  # a concurrent promotion brought it in meanwhile

    def _ended_late(self, index: int) -> None:
        with self._lock:
            self._late[index] -= 1
            ended = self._late[index] == 0
        if ended:
            tier = self.calls[index].tier
            logger.info("the %s tier's late reads have ended; promotions read from it again", tier.name)
