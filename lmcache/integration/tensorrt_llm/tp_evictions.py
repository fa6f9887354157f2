"""In-process tensor parallelism: every rank's L1 drops what rank 0's drops.

TRT-LLM runs one process per rank, so in-process each rank keeps its own L1, and rank 0's scheduler
promises hits from rank 0's alone. Left to itself each L1 would evict by its own recency (rank 0's
lookups pin its hits, which the other ranks cannot see; saves land at slightly different times on
each rank), and another rank could drop a chunk rank 0 then promises: that load would fail.

So rank 0's L1 leads (:class:`Leader`): it records every chunk of a TP world it drops, with the
*incarnation* it dropped, the number of the last save that covered the chunk there (every rank
numbers its saves alike: they are the plans' saves, in order). Rank 0's scheduler sends them with
the next plan (:class:`Dropped`, the plan's ``backend_context``). Every other rank (:class:`Follower`)
drops them on its saver thread, after the saves it was handed before (so its incarnations are at
least as new as rank 0's were), unless a later save covered the chunk again (rank 0 stored it again
too); a chunk one of its own loads holds is dropped at the next plan. A follower does not evict of its
own accord while it has room: its L1 may hold up to :func:`follower_headroom` bytes more than the
configured size, what rank 0 dropped but it has not yet. Should it evict on its own all the same,
it says so (a later promise of that chunk would fail loudly).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.cpu_store import CpuStore

logger = init_logger(__name__)


@dataclass(frozen=True)
class Dropped:
    """The chunks rank 0's L1 dropped since the last plan: ``(chunk hash, world size, incarnation)``."""

    chunks: tuple[tuple[bytes, int, int], ...]


class Incarnations:
    """The number of the last save that covered each chunk held in an L1 (stored it, or found it)."""

    def __init__(self, l1: CpuStore) -> None:
        self.l1 = l1
        self.lock = threading.Lock()
        self.last_save: dict[ChunkKey, int] = {}
        self.enabled = True
        """False once a process holds several ranks (they share one L1): nothing to lead or follow."""

    def saved(self, keys: Sequence[ChunkKey], save_id: int) -> None:
        """After save ``save_id`` stored (or found) ``keys``: those held now are of that incarnation."""
        held = [key for key in keys if key in self.l1]
        with self.lock:
            for key in held:
                self.last_save[key] = save_id


class Leader(Incarnations):
    """Rank 0's L1 observer: every chunk of a TP world it drops, with the incarnation dropped."""

    def __init__(self, l1: CpuStore) -> None:
        super().__init__(l1)
        self._dropped: list[tuple[bytes, int, int]] = []

    def added(self, key: Hashable, chunk: Any) -> None:
        return None

    def removed(self, key: Hashable) -> None:
        if self.enabled and isinstance(key, ChunkKey) and key.world_size > 1:
            with self.lock:
                self._dropped.append((key.chunk_hash, key.world_size, self.last_save.pop(key, -1)))

    def drain(self) -> Dropped:
        """What was dropped since the last drain."""
        with self.lock:
            dropped, self._dropped = self._dropped, []
        return Dropped(tuple(dropped))


class Follower(Incarnations):
    """A rank > 0's L1 observer, and the dropping of what rank 0 dropped."""

    def __init__(self, l1: CpuStore, rank: int) -> None:
        super().__init__(l1)
        self.rank = rank
        self._held: list[tuple[ChunkKey, int]] = []
        """Dropped by rank 0 but held by a load of this rank when asked: dropped at the next plan."""
        self._dropping: ChunkKey | None = None
        self.drifted = 0
        """Chunks this L1 evicted of its own accord (it ran out of room)."""
        self._warn = RateLimitedLog(logger, interval_s=60)

    def added(self, key: Hashable, chunk: Any) -> None:
        return None

    def removed(self, key: Hashable) -> None:
        if not self.enabled or not isinstance(key, ChunkKey):
            return
        with self.lock:
            self.last_save.pop(key, None)
        if key != self._dropping and key.world_size > 1:
            self.drifted += 1
            self._warn.warning(
                "drift",
                "LMCache in-process TP rank %d: L1 evicted a chunk rank 0 had not (it ran out of room); a "
                "later hit on it fails its load. Give max_local_cpu_size more room, or use lmcache-mp.",
                self.rank,
            )

    @property
    def holding(self) -> bool:
        """Some chunk rank 0 dropped is still here, held by a load when asked: ask again."""
        return bool(self._held)

    def drop(self, dropped: Dropped) -> None:
        """Drop what rank 0 dropped, on the saver thread after the saves handed over before: each
        chunk unless a later save covered it again."""
        with self.lock:
            todo, self._held = self._held, []
        todo += [(ChunkKey(h, world, self.rank), incarnation) for h, world, incarnation in dropped.chunks]
        held = []
        for key, incarnation in todo:
            with self.lock:
                if self.last_save.get(key, -1) > incarnation:
                    continue  # saved again after the incarnation rank 0 dropped: rank 0 holds it again
            if key not in self.l1:
                continue
            self._dropping = key
            try:
                if not self.l1.remove(key):
                    held.append((key, incarnation))  # a load of this rank holds it
            finally:
                self._dropping = None
        with self.lock:
            self._held += held


def follower_headroom(chunk_bytes: int, chunk_size: int, iteration_tokens: int) -> int:
    """Room a follower's L1 needs beyond rank 0's: what rank 0 drops over two iterations of saves (its
    drops reach a follower with the next plan; the follower's saves may land before rank 0's)."""
    return 2 * -(-iteration_tokens // chunk_size) * chunk_bytes
