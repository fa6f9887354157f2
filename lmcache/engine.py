"""CacheEngine: lookup (with pins), store and retrieve of KV chunks; one engine, two front doors.

The in-process adapter calls it directly; the multi-process server wraps it. Token ranges are
in tokens of the request's prompt+generation; ``block_ids[j]`` is the pool block holding tokens
``[j*B, (j+1)*B)``. Chunks move whole (a chunk is ``chunk_size / B`` pool rows), except that a
retrieve may skip the leading rows of its first chunk so blocks TRT-LLM already holds are never
rewritten. Keys and lookups live in :mod:`lmcache.engine_lookup`, the engine's base class.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcache import c_ops
from lmcache.chunk_copy import CopyBatcher, CopyStart, GuardedLanding, LoadSlot, StoreSlot
from lmcache.config import GiB, LMCacheEngineConfig
from lmcache.engine_lookup import ChunkSpan, EngineLookup, KeySpace
from lmcache.forward_gate import FORWARD
from lmcache.keys import CacheSalt, ChunkHashes, ChunkKey, Tokens, token_array
from lmcache.layered_load import LayerReady, whole_first
from lmcache.layout import PoolLayout
from lmcache.logging import init_logger
from lmcache.memory import HostArena, SlabSource
from lmcache.storage.cpu_store import CachedChunk, CpuStore
from lmcache.storage.tiers import TierManager
from lmcache.transfer import BlockTransfer

logger = init_logger(__name__)

__all__ = ["CacheEngine", "KeySpace", "LoadHold"]


class CacheEngine(EngineLookup):
    """Stores KV chunks of registered pools in the cache tiers and loads them back; keys and lookups
    come from :class:`~lmcache.engine_lookup.EngineLookup`."""

    def __init__(
        self,
        config: LMCacheEngineConfig,
        *,
        pinned: bool | None = None,
        slab_source: SlabSource | None = None,
    ) -> None:
        """``slab_source``: where L1's slabs live (default: private memory, page-locked if ``pinned``,
        which defaults to whether CUDA is available); the cache server passes shared-memory slabs."""
        capacity = config.max_local_cpu_bytes if config.local_cpu else 0
        has_tiers = config.local_disk is not None or config.remote_url is not None
        if capacity == 0 and has_tiers:
            # Without an L1 cache, chunks still pass through host memory on their way to and from the
            # lower tiers: a small staging area (grown lazily, only as far as it is used).
            capacity = int(config.tier_staging_size_gb * GiB)
        l1 = CpuStore(HostArena(capacity, pinned=pinned, source=slab_source), config.cache_policy)
        if config.local_cpu and l1.arena.pinned:
            # Pin the L1 budget in the background from now on, so saves into a cold cache do not
            # wait for pinning (the staging area without L1 stays lazy).
            l1.arena.prepin()
        # L2 (local_disk) and L3 (remote_url) behind L1; queued writes are flushed by close(), when the
        # engine is garbage-collected, and at interpreter exit.
        super().__init__(config, l1, TierManager.from_config(config, l1) if has_tiers else None)
        self._finalizer = weakref.finalize(self, self.tiers.close) if self.tiers is not None else None

    # -- store ----------------------------------------------------------------------------------

    def store(
        self,
        space: KeySpace,
        rank: int,
        pool: torch.Tensor,
        transfer: BlockTransfer[Tokens | ChunkHashes],
        stream: Any = None,
        copy_start: CopyStart | None = None,
        guard: Callable[[], None] | None = None,
    ) -> int:
        """Save the chunks of ``transfer.prompt`` (token ids, or the prompt's :class:`ChunkHashes`) that
        start at or after ``transfer.start`` and end by ``transfer.end``, from ``pool``'s blocks.

        ``transfer.start`` must be chunk-aligned. Chunks already cached are skipped. Returns the number
        of tokens newly stored. On CUDA the copies are enqueued on ``stream``; readers are ordered
        after them by an event, so nothing waits on the host here. Given ``copy_start``, the copies
        wait for it; the rest of the store (hashing, reserving) does not. ``guard`` raises once the
        blocks may no longer be the caller's: checked before each batch of copies and again before
        each batch is published, once its copies are done (waited for on the host): a batch whose
        copies end after it raised is never published."""
        FORWARD.wait()  # hashing holds the GIL too: not while a forward is being launched
        began = time.perf_counter()
        layout = self._check_pool(space, pool)
        block_ids = transfer.block_ids
        # Reserved a batch of chunks at a time, as CopyBatcher copies them: the first copy starts
        # after one chunk's work, and L1's lock is taken once per batch (D101).
        prompt, salt, most = transfer.prompt, transfer.salt, CopyBatcher.FLUSH_CHUNKS
        slots = self.reserve_store(space, rank, prompt, salt, transfer.start, transfer.end, most)
        last = self.cacheable_end(space, len(transfer.prompt), transfer.end)
        if last <= transfer.start:
            return 0
        c_ops.check_range_blocks(pool, block_ids, transfer.start, last, layout.tokens_per_block)
        reserved: list[StoreSlot] = []
        landing = GuardedLanding(lambda done: self.publish(space, done), guard) if guard else None
        copier: CopyBatcher[StoreSlot] = CopyBatcher(
            pool,
            stream,
            store=True,
            block_ids=block_ids,
            on_flush=landing.add if landing else lambda done, ev: self.publish(space, done, ev),
            start=copy_start,
            guard=guard,
        )
        try:
            for slot in slots:
                if slot.chunk is None:
                    continue
                reserved.append(slot)
                rows = block_ids[slot.first_block : slot.first_block + slot.rows]
                copier.add(rows, slot.view(layout), slot)
                if landing is not None:
                    landing.publish(wait=False)
            copier.finish()  # ``stream`` is after every copy, as callers reuse blocks then
            if landing is not None:
                landing.publish(wait=True)
                _synchronize(pool, stream)
        except BaseException:
            slots.close()  # a batch's slots not reached yet go back
            copier.abandon()
            _synchronize(pool, stream)  # no copy still reads the blocks or writes a slot given back
            self.abort_store(reserved)  # what was not published yet gives its slot back
            raise
        self.latency.store.observe(time.perf_counter() - began)
        return sum(slot.end - slot.start for slot in reserved)

    def reserve_store(
        self,
        space: KeySpace,
        rank: int,
        prompt: Tokens | ChunkHashes,
        salt: CacheSalt,
        start: int,
        end: int,
        most: int = 1,
    ) -> Generator[StoreSlot, None, None]:
        """The chunks a store of ``prompt``'s ``[start, end)`` saves (see :meth:`store`), each with an
        L1 slot reserved (invisible to lookups and safe from eviction until :meth:`publish`) in
        batches of up to ``most`` (:func:`_reserved_in_batches`); chunks already cached come with no
        slot. Whoever iterates owns the slots it was given: fill them and :meth:`publish`, or
        :meth:`abort_store`. ``start`` is checked at once."""
        if start % self.config.chunk_size:
            raise ValueError(f"store start {start} must be a multiple of chunk_size={self.config.chunk_size}")
        spans = (s for s in self.iter_chunk_spans(space, rank, prompt, salt, end) if s.start >= start)
        return _reserved_in_batches(self.l1, spans, space.layout, most)

    def publish(self, space: KeySpace, slots: Sequence[StoreSlot], ready: Any = None) -> None:
        """Make filled slots visible to lookups (``ready``: the event their copies recorded, None when
        they are complete) and queue them for the lower tiers."""
        keys = [slot.key for slot in slots if slot.chunk is not None]
        self.l1.commit_many(keys, ready)
        self._stored(space, keys, sum(s.end - s.start for s in slots if s.chunk))

    def lease_slot(self, space: KeySpace, lease: Hashable) -> CachedChunk | None:
        """Reserve a slot for one full chunk of ``space``'s layout under ``lease`` (any key that is
        not a chunk key): filled before it is known which chunk it holds, then published by
        :meth:`publish_leased` or given back by :meth:`release_lease`. None when L1 has no room."""
        rows = self.config.chunk_size // space.layout.tokens_per_block
        return self.l1.reserve(lease, rows * space.layout.row_bytes, self.config.chunk_size)

    def publish_leased(
        self,
        space: KeySpace,
        rank: int,
        prompt: Tokens | ChunkHashes,
        salt: CacheSalt,
        start: int,
        leases: Sequence[Hashable],
    ) -> int:
        """Publish filled leased slots as the prompt's chunks from ``start`` on: ``leases[i]`` holds the
        full chunk at ``start + i * chunk_size``. A slot whose chunk is already cached, or lies beyond
        the prompt's full chunks, is given back. Every lease named is consumed (KeyError, after the
        rest are given back, if one was not reserved). Returns the tokens published."""
        size = self.config.chunk_size
        if start % size:
            raise ValueError(f"store start {start} must be a multiple of chunk_size={size}")
        end = start + len(leases) * size
        spans = [
            span
            for span in self.iter_chunk_spans(space, rank, prompt, salt, end)
            if span.start >= start and span.end - span.start == size
        ]
        keys: list[ChunkKey] = []
        missing: list[Hashable] = []
        for i, lease in enumerate(leases):
            try:
                if i >= len(spans):
                    self.release_lease(lease, strict=True)
                elif self.l1.publish_as(lease, spans[i].key, size):
                    keys.append(spans[i].key)
            except KeyError:
                missing.append(lease)
        self._stored(space, keys, len(keys) * size)
        if missing:
            raise KeyError(f"{len(missing)} of the leases named were not reserved")
        return len(keys) * size

    def release_lease(self, lease: Hashable, *, strict: bool = False) -> None:
        """Give back a leased slot not published (``strict``: KeyError if none was reserved)."""
        if strict and not self.l1.reserved(lease):
            raise KeyError(lease)
        self.l1.abort(lease)

    def _stored(self, space: KeySpace, keys: list[ChunkKey], tokens: int) -> None:
        """Chunks just published: queued for the lower tiers and counted."""
        if self.tiers is not None and keys:
            # Write-behind: the writer threads wait for the copies' event, never this thread.
            self.tiers.write_behind(self.namespace(space), keys)
        with self._lock:
            self.stats.stored_chunks += len(keys)
            self.stats.stored_bytes += tokens * space.layout.bytes_per_token

    def abort_store(self, slots: Sequence[StoreSlot]) -> None:
        """Give back the slots of chunks not published (a failed or abandoned copy); nothing of them
        was ever visible. Published chunks stay."""
        for slot in slots:
            if slot.chunk is not None:
                self.l1.abort(slot.key)

    # -- retrieve -------------------------------------------------------------------------------

    def retrieve(
        self,
        space: KeySpace,
        rank: int,
        pool: torch.Tensor,
        transfer: BlockTransfer[Tokens | ChunkHashes],
        stream: Any = None,
        pin_id: Hashable | None = None,
        layers: LayerReady | None = None,
        guard: Callable[[], None] | None = None,
        copy_start: CopyStart | None = None,
    ) -> int:
        """Load tokens ``[transfer.start, transfer.end)`` into their blocks of ``pool``; returns how
        many tokens were loaded. Given ``layers``, the load is layer-wise (:mod:`lmcache.layered_load`);
        given ``copy_start``, its chunks are pinned and queued first and its copies wait for it.
        ``guard`` runs before each batch of copies and raises once the blocks may not be the caller's.

        ``start`` and ``end`` must be block-aligned; the prompt (token ids or :class:`ChunkHashes`)
        must reach the end of the chunk that holds ``end`` (its key covers the whole chunk). Blocks
        before ``start`` are never written. Loading stops at the first chunk not cached, so the result
        is a prefix of the request: every block in ``[start, start + result)`` holds cached KV, every
        later block is untouched. This rank's pins of ``pin_id`` are released afterwards."""
        try:
            return self._retrieve(space, rank, pool, transfer, stream, layers, guard, copy_start)
        finally:
            if pin_id is not None:
                self.release(pin_id, rank)

    def _retrieve(
        self,
        space: KeySpace,
        rank: int,
        pool: torch.Tensor,
        transfer: BlockTransfer[Tokens | ChunkHashes],
        stream: Any,
        layers: LayerReady | None,
        guard: Callable[[], None] | None = None,
        copy_start: CopyStart | None = None,
    ) -> int:
        began = time.perf_counter()
        layout = self._check_pool(space, pool)
        hold = self.hold_load(space, rank, transfer.prompt, transfer.salt, transfer.start, transfer.end)
        if hold.end == hold.start:
            return 0
        block_ids = transfer.block_ids
        c_ops.check_range_blocks(pool, block_ids, transfer.start, transfer.end, layout.tokens_per_block)
        chunks = transfer.chunks_touched(self.config.chunk_size)
        copier: CopyBatcher[LoadSlot] = CopyBatcher(
            pool,
            stream,
            store=False,
            block_ids=block_ids,
            on_flush=_read,
            layers=layers,
            whole_first=whole_first(chunks),
            start=copy_start,
            guard=guard,
        )
        try:
            for slot in self.hold_chunks(hold):  # pinned one by one: the first copy starts early
                rows = block_ids[slot.first_block + slot.skip : slot.first_block + slot.stop]
                copier.add(rows, slot.view(layout), slot, slot.chunk.ready)
            copier.finish()
        except BaseException:
            copier.abandon()
            _synchronize(pool, stream)  # the failure is told after every write into the blocks
            raise
        finally:
            loaded = self.finish_load(hold)
        self.latency.retrieve.observe(time.perf_counter() - began)
        return loaded

    def hold_load(
        self, space: KeySpace, rank: int, prompt: Tokens | ChunkHashes, salt: CacheSalt, start: int, end: int
    ) -> LoadHold:
        """Plan a load of ``[start, end)`` (see :meth:`retrieve` for the rules, checked here); its
        chunks are pinned as :meth:`hold_chunks` reaches them, until :meth:`finish_load`."""
        tpb = space.layout.tokens_per_block
        if start % tpb or end % tpb or not 0 <= start <= end:
            raise ValueError(
                f"retrieve range [{start}, {end}) must be block-aligned (tokens_per_block={tpb})"
            )
        # The last chunk may end after ``end`` (a load never claims a prompt's last token): its key
        # needs all its tokens, and only its rows before ``end`` are copied.
        chunk_end = -(-end // self.config.chunk_size) * self.config.chunk_size
        if isinstance(prompt, ChunkHashes) and chunk_end > len(prompt) and end > start:
            raise ValueError(
                f"{len(prompt.hashes)} chunk hashes cover {len(prompt)} tokens; loading up to token {end} "
                f"needs the hashes of the chunks up to token {chunk_end}"
            )
        return LoadHold(space, rank, prompt, salt, start, end, chunk_end, loaded_end=start)

    def hold_chunks(self, hold: LoadHold) -> Iterator[LoadSlot]:
        """Pin the load's chunks in order, promoting from the lower tiers when L1 lacks one, and stop
        at the first chunk not cached; each pinned chunk is yielded and recorded in ``hold``."""
        space, rank, prompt, salt = hold.space, hold.rank, hold.prompt, hold.salt
        start, end, tpb = hold.start, hold.end, space.layout.tokens_per_block
        tiers_asked = self.tiers is None
        previous: ChunkSpan | None = None
        for span in self.iter_chunk_spans(space, rank, prompt, salt, hold.chunk_end):
            if span.end <= start:
                previous = span
                continue
            chunk = self._hold(span.key)
            if chunk is None and not tiers_asked:
                # Not in L1 (e.g. a lookup without pins, then eviction): promote from the lower tiers.
                tiers_asked = True
                assert self.tiers is not None
                spans = self.iter_chunk_spans(space, rank, prompt, salt, hold.chunk_end)
                rest = [s for s in spans if s.start >= span.start]
                _, pins = self.tiers.promote_prefix(
                    self.namespace(space), [[s.key] for s in rest], [s.end - s.start for s in rest]
                )
                if not hold.record_tier_pins(pins):
                    self.tiers.unpin(pins)  # finished meanwhile: not the hold's to release
                    return
                chunk = self._hold(span.key)
            if chunk is None and span.end > end and self.config.save_unfull_chunk:
                assert not isinstance(prompt, ChunkHashes)
                span = self._tail_span(space, rank, prompt, salt, previous, span, end)
                chunk = self._hold(span.key)
                if chunk is None and self.tiers is not None:
                    got, pins = self.tiers.promote_prefix(
                        self.namespace(space), [[span.key]], [span.end - span.start]
                    )
                    if not hold.record_tier_pins(pins):
                        self.tiers.unpin(pins)
                        return
                    chunk = self._hold(span.key) if got else None
            if chunk is None:
                return
            previous = span
            rows = (span.end - span.start) // tpb
            skip = (max(start, span.start) - span.start) // tpb
            stop = (min(end, span.end) - span.start) // tpb
            slot = LoadSlot(span.key, chunk, span.start // tpb, rows, skip, stop)
            if not hold.record(slot, min(end, span.end)):  # finished meanwhile, on another thread
                self.l1.unpin_all([span.key])
                return
            yield slot

    def finish_load(self, hold: LoadHold) -> int:
        """Unpin the load's chunks (their copies are done or abandoned) and count it; returns the
        tokens it loaded. Idempotent."""
        if not hold.finish():
            return hold.loaded_end - hold.start
        self.l1.unpin_all([slot.key for slot in hold.slots])
        if hold.tier_pins:
            assert self.tiers is not None
            self.tiers.unpin(hold.tier_pins)
        loaded = hold.loaded_end - hold.start
        with self._lock:
            self.stats.retrieved_chunks += len(hold.slots)
            self.stats.retrieved_bytes += loaded * hold.space.layout.bytes_per_token
            if hold.loaded_end < hold.end:
                self.stats.failed_retrieves += 1
        return loaded

    def _tail_span(
        self,
        space: KeySpace,
        rank: int,
        tokens: Tokens,
        salt: CacheSalt,
        previous: ChunkSpan | None,
        span: ChunkSpan,
        end: int,
    ) -> ChunkSpan:
        """The partial chunk ``[span.start, end)`` that ``save_unfull_chunk`` may have stored."""
        parent = previous.key.chunk_hash if previous is not None else None
        h = self.hasher(space).tail_hash(token_array(tokens), salt, parent, span.start, end)
        return ChunkSpan(ChunkKey(h, space.world_size, rank), span.start, end)

    def _hold(self, key: ChunkKey) -> CachedChunk | None:
        """Pin a chunk for the duration of a copy out of it."""
        return self.l1.hold(key)

    # -- maintenance ----------------------------------------------------------------------------

    def clear(self) -> int:
        """Drop every L1 chunk not pinned by a pending load; returns how many were dropped.

        The disk and remote tiers are left as they are.
        """
        return self.l1.clear()

    def close(self, timeout: float | None = None) -> None:
        """Flush queued disk/remote writes (bounded by ``timeout``, default ``blocking_timeout_secs``)
        and stop the tier threads. Idempotent; L1 keeps serving afterwards, without lower tiers."""
        if self.tiers is None:
            return
        self.tiers.close(timeout)
        if self._finalizer is not None:
            self._finalizer.detach()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_pool(self, space: KeySpace, pool: torch.Tensor) -> PoolLayout:
        layout = space.layout
        if tuple(pool.shape[1:]) != layout.row_shape or pool.dtype != layout.dtype:
            raise ValueError(
                f"pool {tuple(pool.shape)} {pool.dtype} does not match the registered layout "
                f"[*, {', '.join(map(str, layout.row_shape))}] {layout.dtype}"
            )
        return layout


@dataclass(eq=False)
class LoadHold:
    """A load in progress (see :meth:`CacheEngine.hold_load`): what it asked for, the chunks pinned
    so far (``slots``), the promotions' pins, and where the loaded prefix ends."""

    space: KeySpace
    rank: int
    prompt: Tokens | ChunkHashes
    salt: CacheSalt
    start: int
    end: int
    chunk_end: int
    loaded_end: int
    slots: list[LoadSlot] = field(default_factory=list)
    tier_pins: list[ChunkKey] = field(default_factory=list)
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Orders :meth:`finish` (which may come from another thread: the cache server retiring an
    instance mid-load) against the pins :meth:`record` and :meth:`record_tier_pins` add."""

    def record(self, slot: LoadSlot, loaded_end: int) -> bool:
        """Add a pinned chunk's slot; False if the load finished meanwhile (the pin is not the hold's)."""
        with self.lock:
            if self.finished:
                return False
            self.slots.append(slot)
            self.loaded_end = loaded_end
            return True

    def record_tier_pins(self, pins: list[ChunkKey]) -> bool:
        """Add a promotion's pins; False if the load finished meanwhile (they are not the hold's)."""
        with self.lock:
            if not self.finished:
                self.tier_pins += pins
            return not self.finished

    def finish(self) -> bool:
        """Mark the load finished; False if it already was (its pins are released once)."""
        with self.lock:
            done, self.finished = self.finished, True
            return not done


def _synchronize(pool: torch.Tensor, stream: Any) -> None:
    """Wait on the host for the copies enqueued on ``stream`` (None: the current one) of a CUDA pool."""
    if pool.is_cuda:
        (stream or torch.cuda.current_stream(pool.device)).synchronize()


def _read(slots: list[LoadSlot], event: Any) -> None:
    """Mark the chunks of a load batch as read until ``event`` (their slots are reused after it)."""
    if event is None:  # copied on the host: done already
        return
    done: dict[int, bool] = {}
    for slot in slots:
        slot.chunk.read_until(event, done)


def _reserved_in_batches(
    l1: CpuStore, spans: Iterator[ChunkSpan], layout: PoolLayout, most: int
) -> Generator[StoreSlot, None, None]:
    """Each span's :class:`StoreSlot`, its L1 slot reserved in batches of 1, 2, 4, ... up to ``most``
    chunks, one acquisition of L1's lock each; a batch's slots not yet yielded when the generator is
    closed go back."""
    tpb = layout.tokens_per_block
    size = 1
    waiting: deque[StoreSlot] = deque()
    try:
        while batch := list(itertools.islice(spans, size)):
            sizes = [(s.end - s.start) // tpb for s in batch]
            chunks = l1.reserve_many(
                [
                    (s.key, rows * layout.row_bytes, s.end - s.start)
                    for s, rows in zip(batch, sizes, strict=True)
                ]
            )
            for s, rows, chunk in zip(batch, sizes, chunks, strict=True):
                waiting.append(StoreSlot(s.key, s.start, s.end, s.start // tpb, rows, chunk))
            while waiting:
                yield waiting.popleft()
            size = min(2 * size, most)
    finally:
        for slot in waiting:
            if slot.chunk is not None:
                l1.abort(slot.key)
