"""The LowerTier contract: a tier written only against it (an in-memory dict here) plugs into the
manager with no manager change, is written behind, promoted from, counted, and fails soft."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from tier_helpers import CHUNK_BYTES, load_all, make_pool, store_all, tokens

from lmcache.backoff import Backoff
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.keys import ChunkKey
from lmcache.memory import HostArena
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.lower_tier import (
    ChecksumMemo,
    FetchStatus,
    LowerTier,
    Sink,
    TierStatus,
    WriteItem,
    WriteOutcome,
    payload_view,
)
from lmcache.storage.tiers import TierManager


class MemoryTier(LowerTier):
    """Chunks in a dict; ``down`` makes every call fail soft, as a real tier's outage would."""

    name = "memory"
    where = "this process"
    write_batch = 2

    def __init__(self) -> None:
        self.data: dict[tuple[Namespace, ChunkKey], tuple[bytes, int]] = {}
        self.backoff = Backoff(1.0, 1.0)
        self.lock = threading.Lock()
        self.written = threading.Condition()
        self.corrupt = 0

    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        return False

    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        if not self.backoff.ready():
            return [False] * len(keys)
        with self.lock:
            return [(ns, key) in self.data for key in keys]

    def accepts_writes(self) -> bool:
        return self.backoff.ready()

    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        with self.written:
            for item in items:
                item.chunk.wait_ready_on_host()
                self.data[(item.ns, item.key)] = (payload_view(item.chunk).tobytes(), item.chunk.num_tokens)
            self.written.notify_all()
        return WriteOutcome(len(items), sum(i.chunk.nbytes for i in items), 0)

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        out = []
        for i, key in enumerate(keys):
            with self.lock:
                found = self.data.get((ns, key))
            if found is None:
                out.append(FetchStatus.MISSING)
                continue
            buf = sink(i, len(found[0]), found[1])
            if buf is None:
                out.append(FetchStatus.SKIPPED)
                continue
            buf[:] = found[0]
            out.append(FetchStatus.OK)
        return out

    def status(self) -> TierStatus:
        state = self.backoff.state()
        reason = "down" if state.failing else None
        return TierStatus(reason is None, reason, state.failures, self.corrupt, chunks=len(self.data))

    def close(self) -> None:
        pass


class GatedTier(MemoryTier):
    """A :class:`MemoryTier` whose writes wait for ``gate`` (a slow disk, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        self.gate.wait(10)
        return super().write(items, checksums)

    def close(self) -> None:
        self.gate.set()


def _engine_with(tmp_path, memory: MemoryTier, cpu_chunks: int = 4) -> CacheEngine:  # type: ignore[no-untyped-def]
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=64, max_local_cpu_size=cpu_chunks * CHUNK_BYTES / 2**30
    )
    engine = CacheEngine(config, pinned=False)
    disk = DiskTier(DiskStore(tmp_path, 64 * CHUNK_BYTES), backoff=Backoff(0.05, 0.2))
    engine.tiers = TierManager(engine.l1, [disk, memory], timeout_s=5.0, queue_bytes=64 * CHUNK_BYTES)
    return engine


def test_a_new_tier_is_written_behind_and_promoted_through_the_contract(tmp_path) -> None:  # type: ignore[no-untyped-def]
    memory = MemoryTier()
    engine = _engine_with(tmp_path / "a", memory, cpu_chunks=16)
    pool, toks = make_pool(), tokens(8 * 64)
    assert store_all(engine, pool, toks) == len(toks)
    assert engine.tiers is not None and engine.tiers.flush(5.0)
    assert len(memory.data) == 8 and engine.snapshot().tier("memory").writes == 8
    engine.close()

    # A fresh engine with an empty disk: every chunk comes from the memory tier, and is then
    # written behind to the faster disk tier above it.
    second = _engine_with(tmp_path / "b", memory, cpu_chunks=16)
    dst = list(range(32, 64))
    assert load_all(second, pool, toks, dst) == len(toks)
    assert second.tiers is not None and second.tiers.flush(5.0)
    snap = second.snapshot()
    assert snap.tier("memory").hits == 8 and snap.tier("memory").read_bytes == 8 * CHUNK_BYTES
    assert snap.tier("disk").writes == 8 and snap.tier("disk").hits == 0
    assert second.l1.pinned_keys() == [] and snap.healthy
    second.close()


def test_a_tier_that_is_down_is_skipped_and_reported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    memory = MemoryTier()
    memory.backoff.failed()
    engine = _engine_with(tmp_path, memory)
    pool, toks = make_pool(), tokens(2 * 64)
    assert store_all(engine, pool, toks) == len(toks)
    assert engine.tiers is not None and engine.tiers.flush(5.0)
    snap = engine.snapshot()
    assert memory.data == {} and snap.tier("memory").dropped_writes == 2
    assert not snap.healthy and snap.tier("memory").reason == "down" and snap.tier("disk").writes == 2
    engine.close()


def test_manager_without_tiers_is_refused() -> None:
    l1 = CpuStore(HostArena(CHUNK_BYTES, pinned=False))
    try:
        TierManager(l1, [])
    except ValueError as exc:
        assert "at least one lower tier" in str(exc)
    else:
        raise AssertionError("an empty tier list was accepted")


def test_a_write_behind_is_not_a_use_of_the_chunk() -> None:
    """Under LRU, a chunk only written behind is older than one a load read meanwhile."""
    l1 = CpuStore(HostArena(2 * CHUNK_BYTES, pinned=False, slab_bytes=CHUNK_BYTES), "LRU")
    tier = GatedTier()
    # Room for both writes whether or not the writer took the first off the queue yet.
    tiers = TierManager(l1, [tier], queue_bytes=4 * CHUNK_BYTES)
    ns = Namespace("m", b"sig")
    a, b, c = (ChunkKey(bytes([i]) * 32, 1, 0) for i in range(3))
    for key in (a, b):
        assert l1.reserve(key, CHUNK_BYTES, 64) is not None
        l1.commit(key)
        tiers.write_behind(ns, [key])
    assert l1.hold(a) is not None  # a load reads a, then releases it: a is the most recently used
    l1.unpin(a)
    tier.gate.set()
    assert tiers.flush(5.0) and len(tier.data) == 2
    assert l1.reserve(c, CHUNK_BYTES, 64) is not None  # evicts the least recently used: b
    tiers.close()
    assert a in l1 and b not in l1
