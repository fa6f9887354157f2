import pytest
import torch

from lmcache.memory import HostArena


def test_large_cap_reserves_nothing_until_used() -> None:
    arena = HostArena(10 << 30, pinned=False)
    pool = arena.pool(1 << 20)
    assert arena.reserved_bytes == 0
    buf = pool.allocate()
    assert buf is not None
    assert arena.reserved_bytes == arena.slab_bytes
    assert buf.data.numel() == 1 << 20


def test_slots_come_from_slabs_not_per_chunk_allocations() -> None:
    arena = HostArena(64 << 20, pinned=False, slab_bytes=8 << 20)
    pool = arena.pool(1 << 20)
    bufs = [pool.allocate() for _ in range(16)]
    assert all(b is not None for b in bufs)
    assert arena.reserved_bytes == 16 << 20  # two 8 MiB slabs for sixteen 1 MiB slots
    assert len({b.data.untyped_storage().data_ptr() for b in bufs}) == 2
    ptrs = {b.data.data_ptr() for b in bufs}
    assert len(ptrs) == 16


def test_cap_is_respected_and_free_slots_are_reused() -> None:
    arena = HostArena(3 << 20, pinned=False, slab_bytes=2 << 20)
    pool = arena.pool(1 << 20)
    bufs = [pool.allocate() for _ in range(3)]
    assert all(b is not None for b in bufs)
    assert pool.allocate() is None
    assert arena.reserved_bytes <= 3 << 20
    pool.free(bufs[1])
    again = pool.allocate()
    assert again is not None and again.data.data_ptr() == bufs[1].data.data_ptr()


def test_views_keep_bytes() -> None:
    arena = HostArena(1 << 20, pinned=False)
    buf = arena.pool(4096).allocate()
    assert buf is not None
    v = buf.view(torch.bfloat16, (4, 2, 64))
    v.fill_(1.5)
    assert torch.all(buf.view(torch.bfloat16, (512,)) == 1.5)


def test_reclaim_returns_empty_slabs_of_other_sizes() -> None:
    arena = HostArena(4 << 20, pinned=False, slab_bytes=4 << 20)
    small = arena.pool(1 << 20)
    b = small.allocate()
    assert b is not None
    big = arena.pool(2 << 20)
    assert big.allocate() is None
    small.free(b)
    assert arena.reclaim(keep=big) == 4 << 20
    assert big.allocate() is not None


def test_negative_cap_refused() -> None:
    with pytest.raises(ValueError):
        HostArena(-1)
