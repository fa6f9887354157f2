"""While L1 is still being made from start-up, the cache server's store evicts rather than wait for
memory (``CpuStore(evict_while_made=True)``, benchmarks/RESULTS.md D108); the in-process one waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from lmcache import memory, page_locking
from lmcache.memory import HostArena
from lmcache.storage.cpu_store import CpuStore

SLAB = 1 << 20


class _Slow(memory.SlabSource):
    """Ordinary memory said to be page-locked: the first ``ready`` slabs at once, every later one
    once ``gate`` is set (the driver still making it)."""

    def __init__(self, ready: int) -> None:
        super().__init__(pinned=True)
        self.ready = ready
        self.gate = threading.Event()
        self.count = 0
        self._lock = threading.Lock()

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
    ) -> memory.Slab:
        with self._lock:
            number, self.count = self.count, self.count + 1
        if number >= self.ready:
            assert self.gate.wait(30)
        return self._track(memory.Slab(self.new_id(), torch.zeros(nbytes, dtype=torch.uint8)))


@pytest.fixture
def source(monkeypatch) -> Iterator[_Slow]:
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    made = _Slow(ready=1)
    yield made
    made.gate.set()


def _l1(source: _Slow, *, evict_while_made: bool) -> CpuStore:
    """An L1 of four one-slot slabs being made from start-up: the first is made, the rest hang."""
    arena = HostArena(4 * SLAB, slab_bytes=SLAB, source=source)
    arena.prepin()
    l1 = CpuStore(arena, evict_while_made=evict_while_made)
    deadline = time.monotonic() + 30
    while arena.spare_bytes < SLAB and time.monotonic() < deadline:  # the first slab made
        time.sleep(0.01)
    assert arena.spare_bytes == SLAB and arena.prepinning
    return l1


def _reserve_in_thread(l1: CpuStore, key: str) -> tuple[threading.Event, list[object]]:
    """Reserve ``key`` on another thread: set once it returned, and what it returned."""
    done, got = threading.Event(), []

    def reserve() -> None:
        got.append(l1.reserve(key, SLAB, 256))
        done.set()

    threading.Thread(target=reserve, daemon=True).start()
    return done, got


def test_the_servers_store_evicts_rather_than_wait_for_memory_being_made(source: _Slow) -> None:
    l1 = _l1(source, evict_while_made=True)
    assert l1.reserve("a", SLAB, 256) is not None  # the slab made already
    l1.commit("a")
    done, got = _reserve_in_thread(l1, "b")
    assert done.wait(30), "the reservation waited for the memory still being made"
    assert got[0] is not None
    assert "a" not in l1 and l1.reserved("b")
    assert l1.evictions == 1 and l1.evicted_while_made == 1
    source.gate.set()
    assert l1.arena.wait_prepinned(30)


def test_with_nothing_to_evict_the_servers_store_waits_for_the_memory(source: _Slow) -> None:
    l1 = _l1(source, evict_while_made=True)
    assert l1.reserve("a", SLAB, 256) is not None  # reserved, not committed: nothing may evict it
    done, got = _reserve_in_thread(l1, "b")
    assert not done.wait(0.3), "a reservation with nothing to evict did not wait for the memory"
    source.gate.set()
    assert done.wait(30)
    assert got[0] is not None and l1.reserved("a") and l1.reserved("b")
    assert l1.evictions == 0 and l1.skipped_stores == 0


def test_the_in_process_store_waits_for_the_memory_and_keeps_what_it_holds(source: _Slow) -> None:
    l1 = _l1(source, evict_while_made=False)
    assert l1.reserve("a", SLAB, 256) is not None
    l1.commit("a")
    done, got = _reserve_in_thread(l1, "b")
    assert not done.wait(0.3), "the in-process store evicted instead of waiting for its memory"
    source.gate.set()
    assert done.wait(30)
    assert got[0] is not None and "a" in l1
    assert l1.evictions == 0 and l1.evicted_while_made == 0


def test_once_l1_is_made_the_servers_store_fills_it_before_evicting(source: _Slow) -> None:
    l1 = _l1(source, evict_while_made=True)
    source.gate.set()
    assert l1.arena.wait_prepinned(30)
    for key in "abcd":
        assert l1.reserve(key, SLAB, 256) is not None
        l1.commit(key)
    assert l1.evictions == 0 and len(l1) == 4
    assert l1.reserve("e", SLAB, 256) is not None  # full now: evicts as ever, not counted as early
    assert l1.evictions == 1 and l1.evicted_while_made == 0
