"""Rank 0's L1 leads what every rank's drops under in-process tensor parallelism (.tp_evictions)."""

from __future__ import annotations

from lmcache.integration.tensorrt_llm.tp_evictions import Dropped, Follower, Leader, follower_headroom
from lmcache.keys import ChunkKey
from lmcache.memory import HostArena
from lmcache.storage.cpu_store import CpuStore

SLOT = 4096


def l1(chunks: int) -> CpuStore:
    return CpuStore(HostArena(chunks * SLOT, pinned=False, slab_bytes=SLOT))


def put(store: CpuStore, key: ChunkKey) -> None:
    assert store.reserve(key, SLOT, 64) is not None
    store.commit(key)


def test_the_leader_reports_each_dropped_chunk_with_the_save_that_last_covered_it() -> None:
    store = l1(2)
    leader = Leader(store)
    store.observe(leader)
    a, b, c = (ChunkKey(bytes([i]) * 32, 2, 0) for i in (1, 2, 3))
    put(store, a)
    put(store, b)
    leader.saved([a, b], 4)
    leader.saved([a], 6)  # found cached by a later save
    store.get(a)  # a is used: b goes first
    put(store, c)  # evicts b
    assert store.remove(a)
    assert leader.drain() == Dropped(((b.chunk_hash, 2, 4), (a.chunk_hash, 2, 6)))
    assert leader.drain() == Dropped(())
    solo = ChunkKey(b"\x09" * 32, 1, 0)  # one world of one rank: nothing to lead
    put(store, solo)
    assert store.remove(solo) and leader.drain() == Dropped(())


def test_a_follower_drops_what_rank_0_dropped_unless_saved_again_since() -> None:
    store = l1(4)
    follower = Follower(store, rank=1)
    store.observe(follower)
    x, y = ChunkKey(b"\x01" * 32, 2, 1), ChunkKey(b"\x02" * 32, 2, 1)
    put(store, x)
    put(store, y)
    follower.saved([x, y], 5)
    follower.drop(Dropped(((x.chunk_hash, 2, 3), (y.chunk_hash, 2, 5))))
    assert x in store  # saved again (5) after the incarnation rank 0 dropped (3): rank 0 holds it again
    assert y not in store
    assert store.pin(x)  # a load of this rank holds it: dropped at the next plan
    follower.drop(Dropped(((x.chunk_hash, 2, 5),)))
    assert x in store and follower.holding  # asked again at the next plan, even one with no drops
    store.unpin(x)
    follower.drop(Dropped(()))
    assert x not in store and not follower.holding
    assert follower.drifted == 0


def test_a_follower_that_evicts_on_its_own_says_so() -> None:
    store = l1(1)
    follower = Follower(store, rank=1)
    store.observe(follower)
    put(store, ChunkKey(b"\x01" * 32, 2, 1))
    put(store, ChunkKey(b"\x02" * 32, 2, 1))  # no room: the first is evicted here, not by rank 0
    assert follower.drifted == 1


def test_headroom_is_two_iterations_of_saves() -> None:
    assert follower_headroom(chunk_bytes=1000, chunk_size=256, iteration_tokens=8192) == 2 * 32 * 1000
    assert follower_headroom(chunk_bytes=1000, chunk_size=256, iteration_tokens=300) == 2 * 2 * 1000
