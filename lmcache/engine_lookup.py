"""The key and lookup half of :class:`lmcache.engine.CacheEngine`: chunk keys of a prompt, and the
longest cached prefix (with pins that keep a promised hit from being evicted until it is loaded).

:class:`EngineLookup` is the engine's base class: it owns the engine's counters and its lock,
which the store and retrieve paths in :mod:`lmcache.engine` update too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import CacheSalt, ChunkHashes, ChunkKey, TokenHasher, Tokens, chunk_keys, token_array
from lmcache.layout import PoolLayout
from lmcache.stats import EngineCounters, EngineSnapshot, LatencyStats
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CachedChunk, CpuStore
from lmcache.storage.tiers import TierManager

MAX_SPACES_REMEMBERED = 1024
"""Key spaces whose hasher :meth:`EngineLookup.hasher` finds without a lock (all are forgotten when a
new one would pass it; the hashers themselves stay)."""


@dataclass(frozen=True)
class KeySpace:
    """Who may share chunks: same model, same pool row layout, same tensor-parallel world."""

    model_name: str
    layout: PoolLayout
    world_size: int = 1


@dataclass
class ChunkSpan:
    """One chunk of a request: its key and its token range ``[start, end)``."""

    key: ChunkKey
    start: int
    end: int


class EngineLookup:
    """Chunk keys and prefix lookups over an L1 store and (optionally) the lower tiers behind it."""

    def __init__(self, config: LMCacheEngineConfig, l1: CpuStore, tiers: TierManager | None) -> None:
        self.config = config
        self.l1 = l1
        self.tiers = tiers
        self.stats = EngineCounters()
        self.latency = LatencyStats()
        self._hashers: dict[tuple[str, bytes], TokenHasher] = {}
        self._hasher_of_space: dict[KeySpace, TokenHasher] = {}
        self._pins: dict[Hashable, dict[int, list[Hashable]]] = {}
        self._namespaces: dict[KeySpace, Namespace] = {}
        self._lock = threading.Lock()

    # -- keys ---------------------------------------------------------------------------------

    def hasher(self, space: KeySpace) -> TokenHasher:
        """The hasher of ``space``'s model and layout (spaces of any world size share it)."""
        hasher = self._hasher_of_space.get(space)
        if hasher is not None:  # every lookup asks: no layout signature, no lock
            return hasher
        ident = (space.model_name, space.layout.signature())
        with self._lock:
            hasher = self._hashers.get(ident)
            if hasher is None:
                rows = space.layout.blocks_per_chunk(self.config.chunk_size)
                self._check_room(rows * space.layout.row_bytes)
                hasher = TokenHasher(self.config.chunk_size, self.config.pre_caching_hash_algorithm, *ident)
                self._hashers[ident] = hasher
            if len(self._hasher_of_space) >= MAX_SPACES_REMEMBERED:
                self._hasher_of_space.clear()
            self._hasher_of_space[space] = hasher
            return hasher

    def _check_room(self, chunk_bytes: int) -> None:
        """ValueError if L1 cannot hold one chunk of a layout: it would cache nothing, silently."""
        capacity = self.l1.arena.capacity_bytes
        if self.config.local_cpu and 0 < capacity < chunk_bytes:
            raise ValueError(
                f"the L1 CPU cache ({capacity} bytes: max_local_cpu_size / LMCACHE_MAX_LOCAL_CPU_SIZE, or "
                f"the server's --l1-size-gb) cannot hold one {chunk_bytes}-byte chunk of this pool "
                f"(chunk_size {self.config.chunk_size}); raise it or lower chunk_size"
            )

    def namespace(self, space: KeySpace) -> Namespace:
        """The lower tiers' name for a key space: model and layout signature (the key alone lacks them)."""
        ns = self._namespaces.get(space)
        if ns is None:
            ns = self._namespaces.setdefault(space, Namespace(space.model_name, space.layout.signature()))
        return ns

    def chunk_spans(
        self, space: KeySpace, rank: int, tokens: Tokens, salt: CacheSalt, end: int | None = None
    ) -> list[ChunkSpan]:
        """Every cacheable chunk of ``tokens[:end]``: the full chunks, then (if ``save_unfull_chunk``)
        the block-aligned part of the last partial one."""
        return list(self.iter_chunk_spans(space, rank, tokens, salt, end))

    def iter_chunk_spans(
        self,
        space: KeySpace,
        rank: int,
        tokens: Tokens | ChunkHashes,
        salt: CacheSalt,
        end: int | None = None,
    ) -> Iterator[ChunkSpan]:
        """:meth:`chunk_spans`, each hashed when reached, so copies start before the last is hashed."""
        for h, start, stop in self._iter_hashed(space, tokens, salt, end):
            yield ChunkSpan(ChunkKey(h, space.world_size, rank), start, stop)

    def cacheable_end(self, space: KeySpace, num_tokens: int, end: int | None = None) -> int:
        """Where the last of :meth:`chunk_spans` ends (0: no span), computed without hashing."""
        end = num_tokens if end is None else min(end, num_tokens)
        full = end // self.config.chunk_size * self.config.chunk_size
        if not self.config.save_unfull_chunk:
            return full
        tpb = space.layout.tokens_per_block
        return full + (end - full) // tpb * tpb

    def _iter_hashed(
        self, space: KeySpace, tokens: Tokens | ChunkHashes, salt: CacheSalt, end: int | None
    ) -> Iterator[tuple[bytes, int, int]]:
        hasher = self.hasher(space)
        size = self.config.chunk_size
        if isinstance(tokens, ChunkHashes):
            self._check_chunk_hashes(hasher, tokens)
            count = len(tokens.hashes) if end is None else min(len(tokens.hashes), end // size)
            for i in range(count):
                yield tokens.hashes[i], i * size, (i + 1) * size
            return
        parent: bytes | None = None
        stop = 0
        for parent in hasher.iter_chunk_hashes(tokens, salt, end):
            yield parent, stop, stop + size
            stop += size
        tail_end = self.cacheable_end(space, len(tokens), end)
        if tail_end > stop:
            yield hasher.tail_hash(tokens, salt, parent, stop, tail_end), stop, tail_end

    def _check_chunk_hashes(self, hasher: TokenHasher, prompt: ChunkHashes) -> None:
        """Refuse hashes the engine cannot use, before any of them is looked at."""
        if self.config.save_unfull_chunk:
            raise ValueError(
                "chunk hashes cannot name partial chunks (save_unfull_chunk is on); send the tokens"
            )
        if prompt.chunk_size != self.config.chunk_size:
            raise ValueError(
                f"chunk hashes of {prompt.chunk_size}-token chunks; this cache uses {self.config.chunk_size}"
            )
        if any(len(h) != hasher.digest_size for h in prompt.hashes):
            raise ValueError(f"chunk hashes must be {hasher.digest_size}-byte digests")

    def _tail_probe(
        self,
        space: KeySpace,
        arr: np.ndarray,
        salt: CacheSalt,
        ranks: Sequence[int],
        parent: bytes | None,
        start: int,
    ) -> tuple[int, list[ChunkKey], list[ChunkKey]]:
        """The longest block-aligned partial chunk at ``start`` cached for all ranks (save_unfull_chunk).

        Returns its end, its keys, and the keys a promotion from a lower tier pinned (to unpin later).
        """
        tpb = space.layout.tokens_per_block
        hasher = self.hasher(space)
        longest = min(self.config.chunk_size - tpb, (len(arr) - start) // tpb * tpb)
        candidates: list[tuple[int, list[ChunkKey]]] = []
        for length in range(longest, 0, -tpb):
            h = hasher.tail_hash(arr, salt, parent, start, start + length)
            keys = [ChunkKey(h, space.world_size, rank) for rank in ranks]
            if all(key in self.l1 for key in keys):
                return start + length, keys, []
            candidates.append((start + length, keys))
        if self.tiers is None or not candidates:
            return start, [], []
        ns = self.namespace(space)
        found = iter(self.tiers.present(ns, [key for _, keys in candidates for key in keys]))
        for end, keys in candidates:
            if all([next(found) for _ in keys]):
                got, tier_pins = self.tiers.promote_prefix(ns, [keys], [end - start])
                if got:
                    return end, keys, tier_pins
                self.tiers.unpin(tier_pins)
        return start, [], []

    # -- lookup and pins ----------------------------------------------------------------------

    def lookup(
        self,
        space: KeySpace,
        tokens: Tokens,
        salt: CacheSalt = None,
        *,
        ranks: Sequence[int] = (0,),
        pin_id: Hashable | None = None,
    ) -> int:
        """Tokens of the longest cached prefix present for every rank in ``ranks``.

        With ``pin_id`` the hit chunks stay pinned (safe from eviction) until each rank's ``retrieve``
        with the same id, or ``release(pin_id)``; a new lookup with the same id replaces the old pins.
        """
        return self.lookup_prompt(space, tokens, salt, ranks=ranks, pin_id=pin_id)[0]

    def lookup_prompt(
        self,
        space: KeySpace,
        tokens: Tokens,
        salt: CacheSalt = None,
        *,
        ranks: Sequence[int] = (0,),
        pin_id: Hashable | None = None,
        probe_first: bool = True,
    ) -> tuple[int, ChunkHashes | None]:
        """:meth:`lookup`, and the prompt's full chunks' hashes when it computed them, for the prompt's
        loads and saves to name chunks by (no hashing again). None: a miss found from the first chunk
        alone, or ``save_unfull_chunk``, whose partial chunks need the tokens.

        ``probe_first``: look for the first chunk alone before hashing the rest (a miss then costs one
        chunk's hash; a hit, that chunk's lookup twice). Callers whose recent lookups mostly hit say
        False."""
        began = time.perf_counter()
        if probe_first and self._first_chunk_missing(space, tokens, salt, ranks):
            # Most prompts of a busy server miss: that costs one chunk's hash, not the prompt's.
            return self._lookup_spans(space, [], [], len(tokens), ranks, pin_id, began, None), None
        if not self.config.save_unfull_chunk:  # full chunks only: hashed in one call, from the list
            hashes = self.hasher(space).chunk_hashes(tokens, salt)
            size = self.config.chunk_size
            ends = range(size, (len(hashes) + 1) * size, size)
            hit = self._lookup_spans(space, hashes, ends, len(tokens), ranks, pin_id, began, None)
            return hit, ChunkHashes(hashes, size)
        arr = token_array(tokens)
        spans = list(self._iter_hashed(space, arr, salt, None))
        hashes, ends = [h for h, _, _ in spans], [end for _, _, end in spans]
        return self._lookup_spans(space, hashes, ends, len(arr), ranks, pin_id, began, (arr, salt)), None

    def _first_chunk_missing(
        self, space: KeySpace, tokens: Tokens, salt: CacheSalt, ranks: Sequence[int]
    ) -> bool:
        """True if the lookup is surely a miss: L1 lacks the first chunk for a rank and nothing
        else (a lower tier, a partial chunk) could supply it."""
        if self.tiers is not None or self.config.save_unfull_chunk:
            return False
        first = next(self.hasher(space).iter_chunk_hashes(tokens, salt), None)
        return first is None or not all(ChunkKey(first, space.world_size, rank) in self.l1 for rank in ranks)

    def lookup_hashes(
        self,
        space: KeySpace,
        chunk_hashes: Sequence[bytes],
        num_tokens: int,
        *,
        ranks: Sequence[int] = (0,),
        pin_id: Hashable | None = None,
    ) -> int:
        """:meth:`lookup` of a prompt of ``num_tokens`` tokens whose full chunks the caller hashed.

        ``chunk_hashes`` are what ``self.hasher(space).chunk_hashes(tokens, salt)`` returns (the
        salt is in them), so a client that hashes never ships its tokens. Not available with
        ``save_unfull_chunk``: probing partial chunks needs their tokens.
        """
        began = time.perf_counter()
        size = self.config.chunk_size
        self._check_chunk_hashes(self.hasher(space), ChunkHashes(chunk_hashes, size))
        if len(chunk_hashes) != num_tokens // size:
            raise ValueError(
                f"{len(chunk_hashes)} chunk hashes for {num_tokens} tokens; expected one per full "
                f"chunk of {size} tokens ({num_tokens // size})"
            )
        ends = range(size, (len(chunk_hashes) + 1) * size, size)
        return self._lookup_spans(space, chunk_hashes, ends, num_tokens, ranks, pin_id, began, None)

    def _lookup_spans(
        self,
        space: KeySpace,
        hashes: Sequence[bytes],
        ends: Sequence[int],
        num_tokens: int,
        ranks: Sequence[int],
        pin_id: Hashable | None,
        began: float,
        tail: tuple[np.ndarray, CacheSalt] | None,
    ) -> int:
        """The longest prefix of the chunks (``hashes``, ending at ``ends``) cached for every rank
        (from the lower tiers if need be), then, given the ``tail`` tokens and salt, the longest
        partial chunk after it."""
        if pin_id is not None:
            self.release(pin_id)
        pin = pin_id is not None
        groups = list(zip(*[chunk_keys(hashes, space.world_size, rank) for rank in ranks], strict=True))
        tier_pins: list[ChunkKey] = []
        try:
            taken = self._take(groups, pin)
            if taken < len(groups) and self.tiers is not None:
                # L1 miss: bring the rest of the prefix up from the lower tiers (once), then retake.
                lengths = [end - (ends[i - 1] if i else 0) for i, end in enumerate(ends)]
                got, tier_pins = self.tiers.promote_prefix(
                    self.namespace(space), groups[taken:], lengths[taken:]
                )
                if got:
                    taken += self._take(groups[taken:], pin)
            hit, parent = (ends[taken - 1], hashes[taken - 1]) if taken else (0, None)
            if tail is not None and self.config.save_unfull_chunk and hit % self.config.chunk_size == 0:
                arr, salt = tail
                tail_end, keys, more_pins = self._tail_probe(space, arr, salt, ranks, parent, hit)
                tier_pins += more_pins
                if keys and self._take([tuple(keys)], pin):
                    groups[taken:] = [tuple(keys)]
                    taken += 1
                    hit = tail_end
        finally:
            if tier_pins:
                assert self.tiers is not None
                self.tiers.unpin(tier_pins)
        with self._lock:
            # Another lookup of this id may have recorded its pins since the release above (two at
            # once): this one replaces them, as it would have had it come second.
            replaced = self._pins.pop(pin_id, None) if pin else None
            if pin and taken:  # a miss leaves no record: its caller need not release it
                pinned = groups[:taken]
                self._pins[pin_id] = {rank: [keys[i] for keys in pinned] for i, rank in enumerate(ranks)}
            self.stats.lookups += 1
            self.stats.lookup_tokens += num_tokens
            self.stats.hit_tokens += hit
        if replaced:
            self.l1.unpin_all([key for rank_keys in replaced.values() for key in rank_keys])
        self.latency.lookup.observe(time.perf_counter() - began)
        return hit

    def snapshot(self) -> EngineSnapshot:
        """Counters, L1 usage, each lower tier (counters and health) and latencies, taken now.

        The one source of the engine's stats for metrics, ``/health``, ``lmcache stats`` and the
        cache server (see :mod:`lmcache.stats`).
        """
        with self._lock:
            counters = replace(self.stats)
            pinned_lookups = len(self._pins)
        tiers = self.tiers
        return EngineSnapshot(
            chunk_size=self.config.chunk_size,
            counters=counters,
            l1=self.l1.snapshot(),
            tiers=tiers.snapshots() if tiers is not None else (),
            latency=self.latency.snapshot(),
            pinned_lookups=pinned_lookups,
            promotion_failures=tiers.promotion_failures if tiers is not None else 0,
        )

    def count_misses(self, lookups: int, tokens: int) -> None:
        """Count ``lookups`` lookups (``tokens`` tokens in all) that missed without reaching this engine
        (a server's clients found them missing in its presence counts) as its own."""
        with self._lock:
            self.stats.lookups += lookups
            self.stats.lookup_tokens += tokens

    def _take(self, groups: Sequence[Sequence[ChunkKey]], pin: bool) -> int:
        """How many leading chunks (one key per rank each) are cached for every rank; with ``pin``
        they are pinned, each chunk for all ranks or none."""
        return self.l1.pin_prefix(groups) if pin else self.l1.present_prefix(groups)

    def release(self, pin_id: Hashable, rank: int | None = None) -> None:
        """Drop the pins a lookup took for ``pin_id`` (all ranks, or one rank's once it has loaded)."""
        with self._lock:
            by_rank = self._pins.get(pin_id)
            if by_rank is None:
                return
            if rank is None:
                keys = [key for rank_keys in by_rank.values() for key in rank_keys]
                del self._pins[pin_id]
            else:
                keys = by_rank.pop(rank, [])
                if not by_rank:
                    del self._pins[pin_id]
        self.l1.unpin_all(keys)

    def pinned_chunks(self, pin_id: Hashable, rank: int) -> list[CachedChunk]:
        """The chunks ``pin_id``'s lookup pinned for ``rank``, in prompt order, up to the first no
        longer in L1."""
        with self._lock:
            keys = list(self._pins.get(pin_id, {}).get(rank, ()))
        return self.l1.committed_prefix(keys)

    def pinned_key_count(self, pin_id: Hashable) -> int:
        """How many chunk keys (all ranks together) ``pin_id``'s lookup holds pinned: what releasing
        them costs."""
        with self._lock:
            return sum(map(len, self._pins.get(pin_id, {}).values()))

    def pinned_ids(self) -> list[Hashable]:
        """The ids whose lookups hold pins now."""
        with self._lock:
            return list(self._pins)
