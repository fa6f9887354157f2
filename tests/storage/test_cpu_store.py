from collections import Counter
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.memory import HostArena
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.policies import EvictionPolicy, FIFOPolicy, LFUPolicy, LRUPolicy

SLOT = 1024


def store(capacity_slots: int, policy: str = "LRU") -> CpuStore:
    return CpuStore(HostArena(capacity_slots * SLOT, pinned=False, slab_bytes=SLOT), policy)


def put(s: CpuStore, key: object) -> bool:
    chunk = s.reserve(key, SLOT, 16)
    if chunk is None:
        return False
    chunk.buffer.data.fill_(hash(key) % 251)
    s.commit(key)
    return True


def test_store_evicts_lru_when_full() -> None:
    s = store(3)
    for k in "abc":
        assert put(s, k)
    assert s.get("a") is not None  # a becomes most recent
    assert put(s, "d")
    assert "b" not in s and {"a", "c", "d"} <= set(s.keys())
    assert s.evictions == 1


def test_pinned_chunks_are_never_evicted_and_full_pins_skip_store() -> None:
    s = store(2)
    assert put(s, "a") and put(s, "b")
    assert s.pin("a") and s.pin("b")
    assert not put(s, "c")  # no room, nothing evictable: skipped, nothing dropped
    assert s.skipped_stores == 1
    assert "a" in s and "b" in s
    s.unpin("b")
    assert put(s, "c")
    assert "a" in s and "b" not in s


def test_lfu_steps_past_a_pinned_least_used_chunk_to_an_evictable_one() -> None:
    s = store(2, "LFU")
    assert put(s, "a") and put(s, "b")
    for _ in range(5):
        s.get("b")  # b: 6 uses, a: 1
    assert s.pin("a")  # a pending load holds the least used chunk
    assert put(s, "c")  # b is evictable: it goes, the store is not skipped
    assert "a" in s and "c" in s and "b" not in s
    assert s.skipped_stores == 0


class Refuse:
    """An eviction guard that keeps ``key`` (a lookup in flight claims it)."""

    def __init__(self, key: Hashable | None) -> None:
        self.key = key

    def evictable(self, key: Hashable) -> bool:
        return key != self.key

    def kept(self, key: Hashable, chunk: object) -> None:
        return None


@pytest.mark.parametrize("policy", ["LRU", "LFU", "FIFO"])
def test_a_chunk_stepped_past_keeps_its_place_in_the_order(policy: str) -> None:
    """A victim that may not go now is not counted as used: once free, it is the next victim."""
    s = store(3, policy)
    for k in "abc":
        assert put(s, k)
    claims = Refuse("a")
    s.guard(claims)
    assert put(s, "d") and "a" in s and "b" not in s
    claims.key = None  # the claim ends (a claim's end is not a use)
    assert put(s, "e")
    assert "a" not in s and {"c", "d", "e"} <= set(s.keys())


def test_prefix_pins_take_whole_groups_in_order() -> None:
    s = store(6)
    for k in "abcde":
        put(s, k)
    s.reserve("r", SLOT, 16)  # reserved, not committed: not here yet
    groups = [("a", "b"), ("c",), ("d", "r"), ("e",)]
    assert s.present_prefix(groups) == 2 and s.present_prefix([]) == 0
    assert s.pin_prefix(groups) == 2
    assert sorted(s.pinned_keys()) == ["a", "b", "c"]  # "d" of the incomplete group stays unpinned
    assert s.pin_prefix([("a",), ("x",)]) == 1
    s.unpin_all(["a", "b", "c", "x"])
    assert s.pinned_keys() == ["a"]  # pinned twice, unpinned once
    s.unpin("a")
    assert s.pinned_keys() == [] and s.present_prefix(groups) == 2


def test_reserved_chunks_are_invisible_until_commit() -> None:
    s = store(2)
    chunk = s.reserve("a", SLOT, 16)
    assert chunk is not None
    assert "a" not in s and s.get("a") is None and not s.pin("a")
    assert s.reserve("a", SLOT, 16) is None
    s.abort("a")
    assert len(s) == 0
    assert put(s, "a") and "a" in s


def test_remove_and_clear_spare_pinned() -> None:
    s = store(4)
    for k in "abc":
        put(s, k)
    s.pin("b")
    assert not s.remove("b")
    assert s.clear() == 2
    assert s.keys() == ["b"]


def test_chunks_stored_after_a_clear_get_their_slots_back_in_address_order() -> None:
    s = CpuStore(HostArena(8 * SLOT, pinned=False, slab_bytes=8 * SLOT), "LRU")
    for k in range(6):
        put(s, k)
    first = [s.get(k).buffer.data.data_ptr() for k in range(6)]
    assert first == sorted(first)
    assert s.clear() == 6
    for k in range(6, 12):
        put(s, k)
    again = [s.get(k).buffer.data.data_ptr() for k in range(6, 12)]
    assert again == first  # ascending again, so a prompt's chunks stay back to back


ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "pin", "unpin"]), st.integers(0, 11)), min_size=1, max_size=120
)


def _victim(model: EvictionPolicy, pins: Counter[int]) -> Hashable | None:
    """The chunk a full store evicts next, by the reference ``model``: the first unpinned one in the
    policy's order (pinned ones keep their place); None when every chunk is pinned."""
    return next((key for key in model.victims() if not pins[key]), None)


@pytest.mark.parametrize("policy", ["LRU", "LFU", "FIFO"])
@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_property_capacity_pins_and_order(policy: str, ops: list[tuple[str, int]]) -> None:
    capacity = 4
    s = store(capacity, policy)
    pins: Counter[int] = Counter()
    model = {"LRU": LRUPolicy, "LFU": LFUPolicy, "FIFO": FIFOPolicy}[policy]()
    for op, key in ops:
        if op == "put":
            if key in s:
                continue
            before = set(s.keys())
            expected_victim = _victim(model, pins) if len(before) >= capacity else None
            stored = put(s, key)
            after = set(s.keys())
            evicted = before - after
            if expected_victim is not None and stored:
                assert evicted == {expected_victim}
                model.discard(expected_victim)
            assert stored == (len(before) < capacity or expected_victim is not None)
            if stored:
                model.add(key)
        elif op == "get":
            if s.get(key) is not None:
                model.touch(key)
        elif op == "pin":
            if s.pin(key):
                pins[key] += 1
        elif pins[key]:
            s.unpin(key)
            pins[key] -= 1
            if pins[key] == 0:
                model.touch(key)  # the load that held the pin used the chunk
        assert s.used_bytes <= capacity * SLOT
        assert s.arena.reserved_bytes <= capacity * SLOT
        for k, n in pins.items():
            if n:
                assert k in s, "a pinned chunk was evicted"


def test_a_chunk_size_new_to_a_full_cache_evicts_one_slab_not_the_cache() -> None:
    arena = HostArena(8 << 20, pinned=False, slab_bytes=4 << 20)
    s = CpuStore(arena, "LRU")
    for i in range(8):  # two slabs of 1 MiB chunks: the budget is spent
        assert s.reserve(("full", i), 1 << 20, 256) is not None
        s.commit(("full", i))
    assert arena.wait_growth(30)
    tail = s.reserve(("tail", 0), 1 << 19, 128)  # a partial chunk: another slot size
    assert tail is not None
    assert s.evictions == 4  # the LRU slab's four chunks, not all eight
    assert all(("full", i) in s for i in range(4, 8))


class CountingEvent:
    """Stands for a CUDA event (complete unless ``done`` is False): counts the host waits on it."""

    def __init__(self, done: bool = True) -> None:
        self.waits = 0
        self.done = done

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1


def test_an_eviction_waits_once_for_the_events_a_batch_of_chunks_shares() -> None:
    s = store(9)
    stored, read = CountingEvent(done=False), CountingEvent(done=False)
    for k in range(4):  # stored as one batch, then read back as one, both still running
        chunk = s.reserve(k, SLOT, 16)
        assert chunk is not None
        s.commit(k, stored)
        chunk.read_until(read, {})
    alone = CountingEvent(done=False)
    chunk = s.reserve("alone", SLOT, 16)
    assert chunk is not None
    s.commit("alone", alone)
    for k in range(4):
        assert put(s, ("new", k))
    assert s.evictions == 0  # room to spare: nothing evicted, nothing waited for
    assert stored.waits == read.waits == alone.waits == 0
    for k in range(4, 8):
        assert put(s, ("new", k))  # evicts the batch's four chunks
    assert s.evictions == 4 and stored.waits == 1 and read.waits == 1
    assert put(s, ("new", 8))  # evicts "alone": its own event is waited for
    assert alone.waits == 1 and stored.waits == 1


def test_an_eviction_only_queries_the_events_of_copies_already_done() -> None:
    """Waiting lets go of the GIL with L1's lock held: every thread storing or loading would wait for
    it to come back (D101). A victim whose copies are complete is evicted without a wait."""
    s = store(2)
    done_store, done_read, running = CountingEvent(), CountingEvent(), CountingEvent(done=False)
    old = s.reserve("old", SLOT, 16)
    assert old is not None
    s.commit("old", done_store)
    old.read_until(done_read, {})
    assert s.reserve("mid", SLOT, 16) is not None
    s.commit("mid", running)
    assert put(s, "new")  # evicts "old": its events are complete
    assert s.evictions == 1 and done_store.waits == done_read.waits == 0
    assert put(s, "newer")  # evicts "mid", whose copy still runs: waited for
    assert s.evictions == 2 and running.waits == 1


def test_reserve_many_and_commit_many_act_as_one_call_per_chunk() -> None:
    s = store(3)
    assert put(s, "cached")
    first, again, second = s.reserve_many([("a", SLOT, 16), ("cached", SLOT, 16), ("b", SLOT, 8)])
    assert again is None  # already here: no slot, as reserve
    assert first is not None and second is not None and first.buffer is not second.buffer
    assert second.num_tokens == 8 and "a" not in s and s.reserved("a")
    ready = CountingEvent()
    s.commit_many(["a", "b"], ready)
    assert "a" in s and "b" in s and first.ready is ready and second.ready is ready
    assert s.reserve_many([("c", SLOT, 16)]) != [None]  # full: evicts the oldest, as reserve does
    assert s.evictions == 1 and "cached" not in s


def test_an_eviction_waits_for_every_load_still_reading_the_chunk() -> None:
    """Two loads read one chunk at once, each on its own stream (two engines, or two of the server's
    workers): the first one's copy may still run when the second's has finished and both have
    unpinned it, and its slot must not be handed to another chunk before it ends."""
    s = store(1)
    chunk = s.reserve("shared", SLOT, 16)
    assert chunk is not None
    s.commit("shared", CountingEvent())
    first, second = CountingEvent(done=False), CountingEvent(done=False)
    chunk.read_until(first, {})
    chunk.read_until(second, {})
    assert put(s, "next")  # evicts "shared"
    assert s.evictions == 1 and first.waits == 1 and second.waits == 1
    later = s.reserve("later", SLOT, 16)
    assert later is not None
    s.commit("later", CountingEvent())
    done, running, newest = CountingEvent(), CountingEvent(done=False), CountingEvent()
    for event in (done, running, newest):
        later.read_until(event, {})
    assert later.reads == (newest, running)  # a finished read is forgotten: a hot chunk keeps few


def test_a_reserved_chunk_is_not_removed_while_its_copy_fills_it() -> None:
    """A follower rank drops what rank 0 evicted (``remove``); the same key may be reserved again
    meanwhile, by a store or a promotion whose copy is filling the slot."""
    s = store(2)
    chunk = s.reserve("k", SLOT, 16)
    assert chunk is not None
    assert not s.remove("k")
    other = s.reserve("other", SLOT, 16)
    assert other is not None and other.buffer is not chunk.buffer  # the slot was not handed out again
    s.commit("k")
    assert s.remove("k") and "k" not in s


def two_slabs_of_two() -> CpuStore:
    """A full L1 of two slabs, ``a b`` and ``c d`` (in LRU order)."""
    s = CpuStore(HostArena(4 * SLOT, pinned=False, slab_bytes=2 * SLOT), "LRU")
    for k in "abcd":
        assert put(s, k)
    assert s.arena.wait_growth(30)
    return s


def test_a_new_chunk_size_evicts_nothing_when_no_slab_can_empty() -> None:
    s = two_slabs_of_two()
    assert s.pin("a") and s.pin("c")  # a pending load in each slab: neither can be freed
    assert s.reserve("tail", SLOT // 2, 8) is None  # a partial chunk: another slot size
    assert s.evictions == 0 and s.skipped_stores == 1
    assert sorted(s.keys()) == ["a", "b", "c", "d"]


def test_a_new_chunk_size_evicts_only_a_slab_that_can_empty() -> None:
    s = two_slabs_of_two()
    assert s.pin("a")  # b is older than c and d, but its slab cannot be freed
    assert s.reserve("tail", SLOT // 2, 8) is not None
    assert s.evictions == 2 and sorted(s.keys()) == ["a", "b"]


@pytest.mark.parametrize("loaded", [False, True])
def test_a_write_behind_pin_is_not_a_use_but_a_load_under_it_is(loaded: bool) -> None:
    """A write-behind holds and unpins a chunk without ``use``: alone it leaves the chunk's place in
    the order; a load ending while it holds the chunk still counts, at the last unpin."""
    s = store(3)
    for k in "abc":
        assert put(s, k)
    assert s.hold("a", use=False) is not None  # queued for a lower tier
    if loaded:
        assert s.pin_prefix([("a",)]) == 1
        s.unpin_all(["a"])  # the load's end, while the write-behind still holds a
    s.unpin_all(["a"], use=False)  # written
    assert put(s, "d")
    assert ("a" in s) is loaded and ("b" in s) is not loaded


class IndexGuard:
    """An eviction guard over an index of keys, as the claim index is: a key asked about leaves it."""

    def __init__(self, keys: list[str]) -> None:
        self.indexed = set(keys)

    def evictable(self, key) -> bool:  # noqa: ANN001
        self.indexed.discard(key)
        return True

    def kept(self, key, chunk) -> None:  # noqa: ANN001
        self.indexed.add(key)


@pytest.mark.parametrize("pinned", [["a", "c"], ["a"]])
def test_chunks_the_guard_let_go_but_that_stay_are_handed_back_to_it(pinned: list[str]) -> None:
    """A scan for room of another chunk size asks the guard about chunks of slabs it then cannot free:
    they stay in L1, so the guard must find them again."""
    s = two_slabs_of_two()
    guard = IndexGuard(list(s.keys()))
    s.guard(guard)
    for key in pinned:
        assert s.pin(key)
    s.reserve("tail", SLOT // 2, 8)
    assert set(s.keys()) <= guard.indexed | {"tail"}
