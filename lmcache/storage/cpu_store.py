"""L1: chunks in pinned host memory, evicted by policy, never while pinned by a pending load."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmcache.logging import init_logger
from lmcache.memory import HostArena, HostBuffer, Slab, SlotPool
from lmcache.rate_limit import RateLimitedLog
from lmcache.stats import L1Snapshot
from lmcache.storage.policies import make_policy

logger = init_logger(__name__)
_serials = itertools.count(1)

IDLE_EVENTS_KEPT = 4
"""Completed events an L1 remembers (a store's and a load's batch in turn), holding them alive."""


_reads_lock = threading.Lock()
"""Orders the updates of chunks' ``reads``."""


@dataclass(eq=False)
class CachedChunk:
    """A chunk's bytes in L1.

    ``ready`` (a CUDA event) orders readers after the copy that filled it, recorded once; ``reads``
    holds an event after each asynchronous copy out of it that may still run (:meth:`read_until`):
    several loads may read it at once, on their own streams. The slot is reused only after all of
    them (chunks copied in one batch share their events). ``serial`` names this filling of the
    slot: while a chunk with a given serial exists, its slot holds its bytes. ``used``: a pin ended
    as a use while other pins held the chunk (its last unpin counts it).
    """

    buffer: HostBuffer
    nbytes: int
    num_tokens: int
    ready: Any = None
    reads: tuple[Any, ...] = ()
    pins: int = 0
    used: bool = False
    committed: bool = False
    serial: int = field(default_factory=lambda: next(_serials))

    def wait_ready_on_host(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def read_until(self, event: Any, done: dict[int, bool]) -> None:
        """A copy out of the slot runs until ``event`` (while the chunk is pinned). The events of
        earlier copies that have completed are dropped; ``done`` keeps their answers for one batch,
        whose chunks mostly share them."""
        with _reads_lock:  # two loads reading the chunk at once must not drop each other's event
            kept = [event]
            for earlier in self.reads:
                if earlier is event:
                    continue
                finished = done.get(id(earlier))
                if finished is None:
                    finished = done[id(earlier)] = earlier.query()
                if not finished:
                    kept.append(earlier)
            self.reads = tuple(kept)


class KeyObserver(Protocol):
    """Told, under the store's lock, when a key becomes visible to lookups (with its chunk) and when
    it goes."""

    def added(self, key: Hashable, chunk: CachedChunk) -> None: ...

    def removed(self, key: Hashable) -> None: ...


class EvictionGuard(Protocol):
    """Asked, under the store's lock, before a chunk is evicted: False keeps it (a client's lookup
    claimed it, :mod:`lmcache.server.claims`); True lets it go from the guard's index."""

    def evictable(self, key: Hashable) -> bool: ...

    def kept(self, key: Hashable, chunk: CachedChunk) -> None:
        """``evictable`` said True, but the chunk stays in L1 after all (its slab could not be freed):
        it is to be found again."""


class CpuStore:
    """Key -> chunk in host memory. Thread-safe; every operation is O(1) apart from evictions."""

    def __init__(
        self,
        arena: HostArena,
        policy: str = "LRU",
        on_evict: Callable[[Hashable, CachedChunk], None] | None = None,
    ) -> None:
        self.arena = arena
        self.policy_name = policy.upper()
        self._policy = make_policy(policy)
        self._chunks: dict[Hashable, CachedChunk] = {}
        self._lock = threading.RLock()
        self._warn = RateLimitedLog(logger)
        self._on_evict = on_evict
        self._observers: list[KeyObserver] = []
        self._guard: EvictionGuard | None = None
        self._idle_events: deque[Any] = deque(maxlen=IDLE_EVENTS_KEPT)
        """The events an eviction last waited for: complete, so the chunks sharing them need no wait."""
        self.evictions = 0
        self.skipped_stores = 0
        self.used_bytes = 0
        self._pinned = 0
        """Committed chunks with at least one pin."""

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: Hashable) -> bool:
        chunk = self._chunks.get(key)
        return chunk is not None and chunk.committed

    def observe(self, observer: KeyObserver) -> None:
        """Tell ``observer`` of every committed key, now and from now on."""
        with self._lock:
            self._observers.append(observer)
            for key, chunk in self._chunks.items():
                if chunk.committed:
                    observer.added(key, chunk)

    def guard(self, guard: EvictionGuard) -> None:
        """Ask ``guard`` before every eviction from now on (one guard per store)."""
        with self._lock:
            if self._guard is not None:
                raise ValueError("this L1 already has an eviction guard")
            self._guard = guard

    def keys(self) -> list[Hashable]:
        """The committed keys (tests and tools inspect L1 through it)."""
        with self._lock:
            return [k for k, c in self._chunks.items() if c.committed]

    def reserve(self, key: Hashable, nbytes: int, num_tokens: int) -> CachedChunk | None:
        """A slot for ``key``, evicting unpinned chunks if needed; None (and a warning) if none fits,
        or if ``key`` is already here.

        The chunk stays invisible to lookups and safe from eviction until ``commit``.
        """
        with self._lock:
            return self._reserve(key, nbytes, num_tokens)

    def reserve_many(self, wanted: Sequence[tuple[Hashable, int, int]]) -> list[CachedChunk | None]:
        """:meth:`reserve` of each ``(key, nbytes, num_tokens)`` in order, under one acquisition of
        the lock: threads storing at once (the cache server's, one per rank) then take turns once per
        batch of chunks, not once per chunk (benchmarks/RESULTS.md, D101)."""
        with self._lock:
            return [self._reserve(key, nbytes, num_tokens) for key, nbytes, num_tokens in wanted]

    def _reserve(self, key: Hashable, nbytes: int, num_tokens: int) -> CachedChunk | None:
        """:meth:`reserve` (lock held)."""
        if key in self._chunks:
            return None
        pool = self.arena.pool(nbytes)
        # Once L1 is full every reservation evicts: skip the allocation that would fail first.
        buf = pool.allocate() if pool.may_allocate() else None
        while buf is None:
            if not self._make_room(pool):
                self.skipped_stores += 1
                self._warn.warning(
                    "l1-full",
                    "L1 CPU cache has no room for a %d-byte chunk: its chunks are pinned by pending "
                    "loads, or each slab of another chunk size holds one (%d chunks, %.1f MiB); "
                    "skipping a store. Raise max_local_cpu_size if this persists.",
                    nbytes,
                    len(self._chunks),
                    self.used_bytes / (1 << 20),
                )
                return None
            buf = pool.allocate()
        chunk = CachedChunk(buf, nbytes, num_tokens)
        self._chunks[key] = chunk
        self.used_bytes += pool.slot_bytes
        return chunk

    def commit(self, key: Hashable, ready: Any = None, *, pin: bool = False) -> None:
        """Publish a reserved chunk; ``ready`` is the event its filling copy records. With ``pin`` it
        is pinned in the same step, so nothing can evict it in between (``unpin`` it later)."""
        with self._lock:
            self._commit(key, ready, pin)

    def commit_many(self, keys: Iterable[Hashable], ready: Any = None) -> None:
        """:meth:`commit` of each of ``keys`` (one batch's chunks, filled by copies ending at
        ``ready``), under one acquisition of the lock."""
        with self._lock:
            for key in keys:
                self._commit(key, ready, False)

    def _commit(self, key: Hashable, ready: Any, pin: bool) -> None:
        """:meth:`commit` (lock held)."""
        chunk = self._chunks[key]
        chunk.ready = ready
        if not chunk.committed:
            chunk.committed = True
            self._policy.add(key)
            for observer in self._observers:
                observer.added(key, chunk)
        if pin:
            self._pin_chunk(chunk)

    def publish_as(self, reserved: Hashable, key: Hashable, num_tokens: int, ready: Any = None) -> bool:
        """Publish the chunk reserved under ``reserved`` as ``key`` (see :meth:`commit`), holding
        ``num_tokens``. False, and its slot freed, when ``key`` is already here. Raises KeyError if
        nothing unpublished is reserved under ``reserved``."""
        with self._lock:
            chunk = self._chunks.get(reserved)
            if chunk is None or chunk.committed:
                raise KeyError(reserved)
            if key in self._chunks:
                self._drop(reserved, chunk)
                return False
            del self._chunks[reserved]
            chunk.num_tokens = num_tokens
            self._chunks[key] = chunk
            self.commit(key, ready)
            return True

    def reserved(self, key: Hashable) -> bool:
        """Whether a chunk is reserved under ``key`` and not published yet."""
        with self._lock:
            chunk = self._chunks.get(key)
            return chunk is not None and not chunk.committed

    def abort(self, key: Hashable) -> None:
        """Drop a reserved chunk whose copy failed."""
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None and not chunk.committed:
                self._drop(key, chunk)

    def get(self, key: Hashable) -> CachedChunk | None:
        """The committed chunk for ``key`` (counts as a use for the policy)."""
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is None or not chunk.committed:
                return None
            self._policy.touch(key)
            return chunk

    def committed_prefix(self, keys: Sequence[Hashable]) -> list[CachedChunk]:
        """The committed chunks of ``keys``, in order, up to the first missing (not a use: a lookup
        already counted it)."""
        chunks = []
        with self._lock:
            for key in keys:
                chunk = self._chunks.get(key)
                if chunk is None or not chunk.committed:
                    break
                chunks.append(chunk)
        return chunks

    def pin(self, key: Hashable) -> bool:
        """Protect a committed chunk from eviction until ``unpin``; False if it is not here."""
        with self._lock:
            return self._pin(key) is not None

    def hold(self, key: Hashable, *, use: bool = True) -> CachedChunk | None:
        """:meth:`pin` and :meth:`get` in one step: the committed chunk, pinned (``unpin`` it later),
        or None if it is not here. Without ``use`` the eviction order is left as it is (a write-behind
        copies the chunk to a lower tier: not a use)."""
        with self._lock:
            chunk = self._pin(key)
            if chunk is not None and use:
                self._policy.touch(key)
            return chunk

    def _pin(self, key: Hashable) -> CachedChunk | None:
        """Pin a committed chunk (lock held); None if it is not here."""
        chunk = self._chunks.get(key)
        if chunk is None or not chunk.committed:
            return None
        self._pin_chunk(chunk)
        return chunk

    def _pin_chunk(self, chunk: CachedChunk) -> None:
        """One more pin on a committed chunk (lock held); it stays in the policy's order."""
        if chunk.pins == 0:
            self._pinned += 1
        chunk.pins += 1

    def present_prefix(self, groups: Sequence[Sequence[Hashable]]) -> int:
        """How many leading groups have every key here (``in`` of each key, as cheap)."""
        for count, keys in enumerate(groups):
            for key in keys:
                chunk = self._chunks.get(key)
                if chunk is None or not chunk.committed:
                    return count
        return len(groups)

    def pin_prefix(self, groups: Sequence[Sequence[Hashable]]) -> int:
        """Pin whole groups in order while every key of the group is here; returns how many groups.

        Under one lock acquisition, and the eviction order untouched: a lookup's chunks (one group per
        chunk, one key per rank) cost a dict probe each.
        """
        get = self._chunks.get
        with self._lock:
            count = newly_pinned = 0
            for keys in groups:
                if len(keys) == 1:
                    chunk = get(keys[0])
                    if chunk is None or not chunk.committed:
                        break
                    newly_pinned += chunk.pins == 0  # _pin_chunk, inlined: one call less per chunk
                    chunk.pins += 1
                else:
                    group = [get(key) for key in keys]
                    if any(c is None or not c.committed for c in group):
                        break
                    for chunk in group:
                        self._pin_chunk(chunk)
                count += 1
            self._pinned += newly_pinned
            return count

    def unpin(self, key: Hashable) -> None:
        self.unpin_all((key,))

    def unpin_all(self, keys: Iterable[Hashable], *, use: bool = True) -> None:
        """``unpin`` of each key, under one lock acquisition. A chunk's last unpin counts as a use if
        any of its pins ended as one: by default (a load's end), not with ``use=False`` (a
        write-behind's end)."""
        get = self._chunks.get
        released: list[Hashable] = []
        with self._lock:
            for key in keys:
                chunk = get(key)
                if chunk is None or chunk.pins == 0:
                    continue
                chunk.pins -= 1
                if chunk.pins == 0:
                    self._pinned -= 1
                    if use or chunk.used:
                        chunk.used = False
                        released.append(key)
                elif use:
                    chunk.used = True  # a load ended while a write-behind (say) holds it: count it later
            self._policy.touch_all(released)  # a pin's end is the load's use of the chunk

    def remove(self, key: Hashable) -> bool:
        """Remove an unpinned committed chunk (e.g. found corrupt); pinned chunks stay, and so do
        reserved ones (their copy is filling the slot: :meth:`abort` drops them if it fails)."""
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is None or chunk.pins or not chunk.committed:
                return False
            self._policy.discard(key)
            self._drop(key, chunk)
            return True

    def clear(self) -> int:
        """Remove every unpinned chunk; returns how many."""
        with self._lock:
            victims = [k for k, c in self._chunks.items() if c.pins == 0 and c.committed]
            # Newest first: the slot free lists are stacks, so the next stores get the slots back
            # in the order they first had them (address order), which keeps their copies joinable.
            for key in reversed(victims):
                self.remove(key)
            return len(victims)

    def snapshot(self) -> L1Snapshot:
        """Usage and counters now."""
        with self._lock:
            return L1Snapshot(
                used_bytes=self.used_bytes,
                reserved_bytes=self.arena.reserved_bytes,
                capacity_bytes=self.arena.capacity_bytes,
                chunks=sum(1 for c in self._chunks.values() if c.committed),
                pinned_chunks=sum(1 for c in self._chunks.values() if c.pins),
                evictions=self.evictions,
                skipped_stores=self.skipped_stores,
                eviction_policy=self.policy_name,
            )

    def pinned_keys(self) -> list[Hashable]:
        with self._lock:
            return [k for k, c in self._chunks.items() if c.pins]

    def _make_room(self, pool: SlotPool) -> bool:
        """Free room for a slot of ``pool`` (lock held), evicting only what makes it. In the policy's
        order, past pinned and claimed chunks: the first chunk of ``pool``'s size, or every chunk of
        the first slab of another size whose chunks are all evictable (slabs hold one size: their room
        serves another only once wholly free), an empty such slab before any eviction. False, nothing
        evicted, when there is none. Chunks stepped past keep their place and use counts; those the
        guard let go but that stay are handed back to it (:meth:`EvictionGuard.kept`)."""
        if self._pinned >= len(self._policy):  # every committed chunk is pinned: nothing to skip through
            return self.arena.reclaim(keep=pool) > 0
        guard = self._guard
        chunks = self._chunks
        seen: dict[Slab, list[Hashable]] = {}  # per slab of another size: its evictable chunks
        reclaimed = False  # empty slabs of other sizes were asked for first
        try:
            for key in self._policy.victims():
                chunk = chunks[key]
                if chunk.pins:  # pinned by a pending load: in use; the next one goes
                    continue
                buf = chunk.buffer
                if buf.pool is not pool and not reclaimed:
                    if self.arena.reclaim(keep=pool):
                        return True
                    reclaimed = True
                if guard is not None and not guard.evictable(key):  # claimed by a lookup in flight
                    continue
                if buf.pool is pool:
                    self._evict(key, chunk)
                    return True
                keys = seen.setdefault(buf.held, [])
                keys.append(key)
                # Its slab's slots all hold chunks seen evictable (a pinned, claimed or reserved chunk is
                # never seen, so it keeps the count short): evicting them frees the slab.
                if len(keys) == buf.pool.slab_used(buf.slab):
                    for victim in seen.pop(buf.held):
                        self._evict(victim, chunks[victim])
                    self.arena.reclaim(keep=pool)
                    return True
            return not reclaimed and self.arena.reclaim(keep=pool) > 0
        finally:
            if guard is not None:
                for key in (k for keys in seen.values() for k in keys):
                    guard.kept(key, chunks[key])

    def _evict(self, key: Hashable, chunk: CachedChunk) -> None:
        self._policy.discard(key)
        self._drop(key, chunk)
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict(key, chunk)

    def _drop(self, key: Hashable, chunk: CachedChunk) -> None:
        del self._chunks[key]
        if chunk.committed:
            for observer in self._observers:
                observer.removed(key)
        self._wait_idle(chunk)
        self.used_bytes -= chunk.buffer.pool.slot_bytes
        chunk.buffer.pool.free(chunk.buffer)

    def _wait_idle(self, chunk: CachedChunk) -> None:
        """Wait on the host until no copy fills or reads the chunk's slot. An eviction takes a batch's
        chunks one after another, and they share their events: each is waited for once. An event
        already complete (the usual victim's) is only queried: a wait lets go of the GIL, and getting
        it back, with the lock held, makes every thread that stores or loads wait too (D101)."""
        for event in (chunk.ready, *chunk.reads):
            if event is not None and not any(event is done for done in self._idle_events):
                if not event.query():
                    event.synchronize()
                self._idle_events.append(event)
