"""The tiers behind L1: write-behind to each :class:`~lmcache.storage.lower_tier.LowerTier` (L2 disk,
L3 Redis/Valkey, ...), lookups down the tiers and promotion of their hits into L1.

The manager never names a tier: it holds them in order (fastest first) and speaks only the
:class:`LowerTier` contract. A new tier is a module implementing it plus its factory in
:data:`TIER_FACTORIES`.

Threads and who does what:

- the engine's caller (store): commits chunks into L1 and calls :meth:`TierManager.write_behind`,
  which pins each chunk (its L1 slot cannot be reused) and appends it to a bounded per-tier queue.
  Nothing else happens on that path; a full queue drops the write with a rate-limited warning.
- one writer thread per lower tier drains its queue in batches of the tier's ``write_batch``: the
  tier waits for each chunk's filling copy on the host (the store's CUDA event), writes the L1
  bytes, and the writer unpins the chunks. Neither pin nor unpin is a use of the chunk for L1's
  eviction order: a chunk only written behind ages as if nobody held it.
- the engine's caller (lookup, or retrieve after an L1 miss): :meth:`TierManager.promote_prefix`
  finds each chunk in L1 or asks the tiers in order (one ``contains`` call per tier for the keys
  still unknown), then moves the available prefix into L1: every tier fetches its chunks straight
  into L1 slots reserved as their headers check out, the tiers in parallel on their own fetch threads
  (:class:`~lmcache.storage.promotion.TierReads`), and the caller waits for them at most
  ``lookup_timeout_ms`` in all: a tier's reads still running then are misses (the prefix ends before
  them), and what they reserved is given back when they end. Promoted chunks are committed and pinned
  atomically, so they stay put until the engine has taken its own pins, and are queued for the faster
  tiers above the one they came from. Promotion is synchronous in this version, also with
  ``enable_async_loading``.

Failures degrade, never raise: each tier backs off after a failure (:class:`lmcache.backoff.Backoff`)
and answers "missing" / "dropped" meanwhile; the manager calls it through
:class:`~lmcache.storage.lower_tier.FailSoft`, so even a tier that raises (or is closed under a
promotion) only misses. Nothing unverified is ever committed to L1.

``close()`` (and an ``atexit`` hook that holds the manager only weakly) waits up to
``blocking_timeout_secs`` for the queues to drain, so a clean shutdown loses no queued write.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.stats import TierSnapshot
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.lower_tier import ChecksumMemo, FailSoft, LowerTier, WriteItem
from lmcache.storage.promotion import IN_L1, Cell, TierRead, TierReads, undo
from lmcache.storage.remote_store import RemoteStore

logger = init_logger(__name__)

__all__ = ["TIER_FACTORIES", "TierManager"]

TIER_FACTORIES: tuple[Callable[[LMCacheEngineConfig], LowerTier | None], ...] = (
    DiskTier.from_config,
    RemoteStore.from_config,
)
"""Builders of the lower tiers, fastest first; each returns None when the config leaves it off."""


class _WriteQueue:
    """A bounded FIFO of pinned chunks for one tier, drained in batches by one daemon thread."""

    def __init__(
        self,
        name: str,
        l1: CpuStore,
        handler: Callable[[list[WriteItem]], None],
        max_bytes: int,
        batch_items: int,
    ) -> None:
        self.name = name
        self.l1 = l1
        self.handler = handler
        self.max_bytes = max_bytes
        self.batch_items = max(1, batch_items)
        self._items: deque[WriteItem] = deque()
        self._cond = threading.Condition()
        self.queued_bytes = 0
        self.pending = 0  # queued + being written
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"lmcache-{name}-writer", daemon=True)
        self._thread.start()

    def offer(self, item: WriteItem) -> bool:
        with self._cond:
            if self._stopping:
                return False
            if self._items and self.queued_bytes + item.chunk.nbytes > self.max_bytes:
                return False
            self._items.append(item)
            self.queued_bytes += item.chunk.nbytes
            self.pending += 1
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if not self._items:
                    return
                batch = [self._items.popleft() for _ in range(min(self.batch_items, len(self._items)))]
                self.queued_bytes -= sum(item.chunk.nbytes for item in batch)
            try:
                self.handler(batch)
            except BaseException:  # noqa: BLE001 - the writer must survive anything
                logger.exception("%s writer: unexpected error; %d chunks not written", self.name, len(batch))
            finally:
                self.l1.unpin_all((item.key for item in batch), use=False)  # a write is not a use
                with self._cond:
                    self.pending -= len(batch)
                    self._cond.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, deadline: float) -> int:
        """Stop the thread once the queue is empty (or at ``deadline``); returns how many were dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._items)
            self._items.clear()
            self.queued_bytes = 0
            self.pending -= len(left)
        self.l1.unpin_all((item.key for item in left), use=False)
        return len(left)


@dataclass
class _Counters:
    """What the manager counts for one tier (the tier counts its own failures and corruption)."""

    hits: int = 0
    read_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0
    dropped_writes: int = 0


_LIVE: weakref.WeakSet[TierManager] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for manager in list(_LIVE):
        try:
            manager.close()
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            logger.exception("flushing the cache tiers at exit failed")


atexit.register(_close_all_at_exit)


class TierManager:
    """Lower tiers (fastest first) behind an L1 :class:`CpuStore`. ``read_timeout_s``: how long one
    promotion waits for the tiers' reads in all (None: as long as they take; the engine's
    configuration sets ``lookup_timeout_ms``)."""

    def __init__(
        self,
        l1: CpuStore,
        tiers: Sequence[LowerTier],
        *,
        timeout_s: float = 10.0,
        queue_bytes: int | None = None,
        fetch_batch: int = 8,
        read_timeout_s: float | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("TierManager needs at least one lower tier")
        self.l1 = l1
        self.tiers = tuple(tiers)
        self._calls = tuple(FailSoft(tier) for tier in self.tiers)
        self.timeout_s = timeout_s
        self.fetch_batch = max(1, fetch_batch)
        self._checksums = ChecksumMemo()
        self._counters = [_Counters() for _ in self.tiers]
        self._promotion_failures = 0
        self._stats_lock = threading.Lock()
        self._warn = RateLimitedLog(logger)
        self._closed = False
        self._close_lock = threading.Lock()
        if queue_bytes is None:
            queue_bytes = max(l1.arena.capacity_bytes // 4, 1)
        self._queues = [
            _WriteQueue(tier.name, l1, self._writer_for(index), queue_bytes, tier.write_batch)
            for index, tier in enumerate(self.tiers)
        ]
        self._reads = TierReads(l1, self._calls, read_timeout_s)
        _LIVE.add(self)

    @classmethod
    def from_config(cls, config: LMCacheEngineConfig, l1: CpuStore) -> TierManager | None:
        """The tiers ``config`` asks for (see :data:`TIER_FACTORIES`), or None when there are none."""
        tiers = [tier for factory in TIER_FACTORIES if (tier := factory(config)) is not None]
        if not tiers:
            return None
        return cls(
            l1,
            tiers,
            timeout_s=config.blocking_timeout_secs,
            queue_bytes=config.tier_write_queue_bytes,
            fetch_batch=config.remote_fetch_batch,
            read_timeout_s=config.lookup_timeout_ms / 1000.0,
        )

    def _count(self, index: int, **deltas: int) -> None:
        counters = self._counters[index]
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(counters, name, getattr(counters, name) + delta)

    # -- stats ----------------------------------------------------------------------------------

    @property
    def read_timeout_s(self) -> float | None:
        """How long one promotion waits for the tiers' reads in all (None: unbounded)."""
        return self._reads.timeout_s

    @property
    def promotion_failures(self) -> int:
        """Promotions that stopped short of the prefix they had found (a read failed or was late, or L1
        was full)."""
        return self._promotion_failures

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        """One :class:`TierSnapshot` per tier, in order: the manager's counters plus the tier's status."""
        out = []
        for tier, counters in zip(self.tiers, self._counters, strict=True):
            status = tier.status()
            reason = "closed" if self._closed else status.reason
            with self._stats_lock:
                c = _Counters(**vars(counters))
            out.append(
                TierSnapshot(
                    name=tier.name,
                    where=tier.where,
                    healthy=reason is None,
                    reason=reason,
                    hits=c.hits,
                    read_bytes=c.read_bytes,
                    writes=c.writes,
                    write_bytes=c.write_bytes,
                    dropped_writes=c.dropped_writes,
                    corrupt_chunks=status.corrupt_chunks,
                    failures=status.failures,
                    used_bytes=status.used_bytes,
                    capacity_bytes=status.capacity_bytes,
                    chunks=status.chunks,
                    evictions=status.evictions,
                    state=status.state,
                )
            )
        return tuple(out)

    # -- write-behind ---------------------------------------------------------------------------

    def write_behind(self, ns: Namespace, keys: Sequence[ChunkKey], *, above: int | None = None) -> None:
        """Queue newly committed L1 chunks for the lower tiers (never blocks on I/O): every tier, or
        only those faster than the tier index ``above`` (chunks promoted from it)."""
        if self._closed:
            return
        targets = range(len(self.tiers) if above is None else above)
        for key in keys:
            for index in targets:
                tier = self._calls[index]
                if tier.known(ns, key):
                    continue
                if tier.accepts_writes():
                    self._offer(index, ns, key)
                else:
                    self._count(index, dropped_writes=1)

    def _offer(self, index: int, ns: Namespace, key: ChunkKey) -> None:
        chunk = self.l1.hold(key, use=False)  # pinned until written; not a use for the eviction order
        if chunk is None:
            return
        queue = self._queues[index]
        if not queue.offer(WriteItem(ns, key, chunk)):
            self.l1.unpin_all((key,), use=False)
            self._count(index, dropped_writes=1)
            self._warn.warning(
                f"{queue.name}-full",
                "%s tier write-behind queue is full (%.1f MiB queued); dropping writes of new chunks "
                "(they stay in L1). The %s tier is slower than the store rate; raise the "
                "tier_write_queue_bytes setting if this persists.",
                queue.name,
                queue.queued_bytes / (1 << 20),
                queue.name,
            )

    def _writer_for(self, index: int) -> Callable[[list[WriteItem]], None]:
        tier = self.tiers[index]

        def write(items: list[WriteItem]) -> None:
            outcome = tier.write(items, self._checksums)
            self._count(
                index,
                writes=outcome.written,
                write_bytes=outcome.written_bytes,
                dropped_writes=outcome.dropped,
            )

        return write

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has been written (or dropped); False on timeout."""
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        ok = True
        for queue in self._queues:
            ok = queue.wait_idle(deadline) and ok
        return ok

    def close(self, timeout: float | None = None) -> bool:
        """Flush the queues (bounded by ``timeout``, default ``blocking_timeout_secs``), stop the threads.

        Idempotent. Returns False if writes were still queued at the deadline (they are dropped).
        """
        with self._close_lock:
            if self._closed:
                return True
            self._closed = True
        _LIVE.discard(self)
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        for queue in self._queues:
            queue.wait_idle(deadline)
        dropped = 0
        for index, queue in enumerate(self._queues):
            left = queue.stop(deadline)
            self._count(index, dropped_writes=left)
            dropped += left
        if dropped:
            logger.warning(
                "closing the cache tiers: %d queued writes not flushed before the deadline", dropped
            )
        self._reads.close()
        for tier in self.tiers:
            tier.close()
        return dropped == 0

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lookups and promotion ------------------------------------------------------------------

    def present(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which chunks some tier holds (L1, then each tier in order for the rest)."""
        found = [key in self.l1 for key in keys]
        for index in self._locate(ns, keys, [i for i, f in enumerate(found) if not f]):
            found[index] = True
        return found

    def _locate(self, ns: Namespace, keys: Sequence[ChunkKey], unknown: list[int]) -> dict[int, int]:
        """Which tier (index) holds each of ``keys[i]`` for ``i`` in ``unknown``; absent: none."""
        where: dict[int, int] = {}
        if self._closed:
            return where
        for t, tier in enumerate(self._calls):
            if not unknown:
                break
            flags = tier.contains(ns, [keys[i] for i in unknown])
            for i, flag in zip(unknown, flags, strict=True):
                if flag:
                    where[i] = t
            unknown = [i for i in unknown if i not in where]
        return where

    def promote_prefix(
        self, ns: Namespace, positions: Sequence[Sequence[ChunkKey]], tokens: Sequence[int]
    ) -> tuple[int, list[ChunkKey]]:
        """Bring the longest prefix of ``positions`` (each a list of keys that must all be present, e.g.
        one per rank) into L1. Returns how many positions are now in L1 and the keys this call pinned
        there (the caller unpins them with :meth:`unpin` once it holds its own pins).

        ``tokens[p]``: how many tokens position ``p``'s chunks hold. A tier's chunk of another length
        is not promoted (its header is consistent but it is not the chunk its key names: a load would
        read past its slot), so the prefix ends there."""
        if len(tokens) != len(positions):
            raise ValueError(f"{len(tokens)} token counts for {len(positions)} positions")
        if not positions or self._closed:
            return 0, []
        flat = [key for keys in positions for key in keys]
        in_l1 = [key in self.l1 for key in flat]
        located = self._locate(ns, flat, [i for i, here in enumerate(in_l1) if not here])
        where: list[list[int | None]] = []
        i = 0
        for keys in positions:
            row: list[int | None] = []
            for _ in keys:
                row.append(IN_L1 if in_l1[i] else located.get(i))
                i += 1
            where.append(row)
        prefix = next((p for p, row in enumerate(where) if None in row), len(where))
        pins: list[ChunkKey] = []
        done = 0
        deadline = self._reads.deadline()
        while done < prefix:
            stop = min(prefix, done + self.fetch_batch)
            try:
                ok = self._promote_window(ns, positions, tokens, where, done, stop, pins, deadline)
            except Exception as e:  # a fault of ours (the tiers' calls are guarded): a miss, never a raise
                self._warn.warning("promotion-fault", "promoting chunks from the tiers failed: %r", e)
                ok = 0
            done += ok
            if done < stop:
                with self._stats_lock:
                    self._promotion_failures += 1
                break
        return done, pins

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self.l1.unpin_all(keys)

    def _relocate(self, ns: Namespace, key: ChunkKey) -> int | None:
        """The first tier that knows it holds ``key`` without I/O (for a chunk L1 just lost)."""
        return next((t for t, tier in enumerate(self._calls) if tier.known(ns, key)), None)

    def _promote_window(
        self,
        ns: Namespace,
        positions: Sequence[Sequence[ChunkKey]],
        tokens: Sequence[int],
        where: list[list[int | None]],
        start: int,
        stop: int,
        pins: list[ChunkKey],
        deadline: float | None,
    ) -> int:
        """Promote positions ``[start, stop)``, waiting for the tiers' reads until ``deadline``; returns
        how many leading positions succeeded."""
        l1 = self.l1
        # 0. Pin what L1 already has in the window first, so reserving slots below cannot evict it.
        #    A chunk evicted since ``where`` was computed may still be in a tier.
        prepinned: set[ChunkKey] = set()
        for p in range(start, stop):
            for i, key in enumerate(positions[p]):
                if where[p][i] == IN_L1:
                    if l1.pin(key):
                        prepinned.add(key)
                    else:
                        where[p][i] = self._relocate(ns, key)
        # 1. In order: take those pins, up to the first chunk no tier has.
        rows: list[list[Cell]] = []
        for p in range(start, stop):
            row: list[Cell] = []
            ok = True
            for i, key in enumerate(positions[p]):
                source = where[p][i]
                ok = source is not None and (source != IN_L1 or key in prepinned)
                prepinned.discard(key)
                if not ok:
                    break
                assert source is not None
                row.append(Cell(key, source, tokens[p]))
            if not ok:
                self._release_row(row)
                break
            rows.append(row)
        l1.unpin_all(prepinned)  # pinned in step 0 but past the first failure

        # 2. Each tier fetches its cells into slots reserved as their headers check out, on its own
        #    threads, the tiers in parallel; the reads still running at ``deadline`` are given up (the
        #    cells are theirs to publish or give back; here they are settled misses). Past the deadline,
        #    or from a tier whose read given up earlier still runs, nothing is read: the cells are misses.
        by_tier: dict[int, list[Cell]] = {}
        for row in rows:
            for cell in row:
                if cell.source != IN_L1:
                    by_tier.setdefault(cell.source, []).append(cell)
        reads: list[TierRead] = []
        try:
            for t, cells in by_tier.items():
                read = self._reads.start(ns, t, cells, deadline)
                if read is not None:
                    reads.append(read)
            self._reads.wait(reads, deadline)
            return self._publish(ns, rows, pins)
        except BaseException:
            self._reads.give_up(reads)  # no read still running may fill a slot given back below
            undo(self.l1, rows)
            raise

    def _publish(self, ns: Namespace, rows: list[list[Cell]], pins: list[ChunkKey]) -> int:
        """Publish in order: commit + pin as one step; the leading complete positions are the result.
        Chunks promoted from a tier are queued for the faster tiers above it."""
        l1 = self.l1
        leading = 0
        broken = False
        promoted: dict[int, list[ChunkKey]] = {}
        for row in rows:
            keep = not broken and all(c.source == IN_L1 or c.ok for c in row)
            for c in row:
                if c.settled:  # given up with its late read, which publishes or gives back its slot
                    continue
                if c.source == IN_L1:
                    if keep:
                        pins.append(c.key)
                    else:
                        l1.unpin(c.key)
                    c.settled = True
                    continue
                if c.chunk is None:
                    c.settled = True
                    continue
                if not c.ok:
                    l1.abort(c.key)
                    c.settled = True
                    continue
                l1.commit(c.key, None, pin=keep)
                if keep:
                    pins.append(c.key)
                c.settled = True
                self._count(c.source, hits=1, read_bytes=c.chunk.nbytes)
                promoted.setdefault(c.source, []).append(c.key)
            if keep:
                leading += 1
            else:
                broken = True
        for index, keys in promoted.items():
            if index > 0:
                self.write_behind(ns, keys, above=index)
        return leading

    def _release_row(self, row: list[Cell]) -> None:
        for cell in row:
            if cell.source == IN_L1:
                self.l1.unpin(cell.key)
