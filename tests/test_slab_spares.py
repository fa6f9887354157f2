"""A pool out of slots takes a pre-pinned spare rather than wait for its own slab still on its way
(lmcache.memory, benchmarks/RESULTS.md D88)."""

from __future__ import annotations

import threading

import torch

from lmcache import memory, page_locking
from lmcache.memory import HostArena

SLAB = 1 << 20


class _Gated(memory.SlabSource):
    """Hands out ordinary memory (said to be page-locked); the allocations numbered in ``held`` (from
    0) wait for their ``release`` event; ``started`` counts allocations begun."""

    def __init__(self, *held: int) -> None:
        super().__init__(pinned=True)
        self.release = {number: threading.Event() for number in held}
        self.started = threading.Semaphore(0)
        self.count = 0
        self._lock = threading.Lock()

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
    ) -> memory.Slab:
        with self._lock:
            number, self.count = self.count, self.count + 1
        self.started.release()
        if number in self.release:
            assert self.release[number].wait(30)
        return self._track(memory.Slab(self.new_id(), torch.zeros(nbytes, dtype=torch.uint8)))


def test_a_pool_waiting_for_its_slab_ahead_takes_a_spare_meanwhile(monkeypatch) -> None:
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    source = _Gated(1)  # the pool's slab grown ahead hangs in the driver
    arena = HostArena(4 * SLAB, slab_bytes=SLAB, source=source)
    pool = arena.pool(SLAB)  # one slot per slab
    first = pool.allocate()
    assert first is not None and source.started.acquire(timeout=30)  # slab 0, then the one ahead starts
    assert source.started.acquire(timeout=30)
    with arena.lock:  # a slab pre-pinning made meanwhile
        arena.reserved_bytes += SLAB
    spare = source.allocate(SLAB)
    arena.add_spare(spare)
    got: list[memory.HostBuffer | None] = []
    thread = threading.Thread(target=lambda: got.append(pool.allocate()), daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert got and got[0] is not None and got[0].ref.slab == spare.id  # not the slab on its way
    finally:
        source.release[1].set()
        thread.join(30)
    assert arena.wait_growth(30)
