import gc
import threading

import pytest
import torch

from lmcache import host_slabs, memory, page_locking
from lmcache.memory import HostArena


def test_large_cap_reserves_nothing_until_used() -> None:
    arena = HostArena(10 << 30, pinned=False)
    pool = arena.pool(1 << 20)
    assert arena.reserved_bytes == 0
    assert arena.wait_growth(30)
    assert arena.reserved_bytes == 0  # nothing is grown ahead before the first use either
    buf = pool.allocate()
    assert buf is not None
    assert buf.data.numel() == 1 << 20
    # the first slab, plus at most the next one being allocated ahead
    assert arena.slab_bytes <= arena.reserved_bytes <= 2 * arena.slab_bytes
    assert arena.wait_growth(30)
    assert arena.reserved_bytes == 2 * arena.slab_bytes


def test_grows_ahead_by_at_most_one_slab() -> None:
    slab = 4 << 20
    arena = HostArena(64 << 20, pinned=False, slab_bytes=slab)
    pool = arena.pool(1 << 20)
    bufs = []
    for _ in range(20):
        buf = pool.allocate()
        assert buf is not None
        bufs.append(buf)
        used = len(bufs) << 20
        used_slabs = -(-used // slab)
        assert arena.reserved_bytes <= (used_slabs + 1) * slab
        assert arena.wait_growth(30)
        assert arena.reserved_bytes <= (used_slabs + 1) * slab
    # 20 slots fill five slabs; the sixth was grown ahead when the fifth was first used
    assert arena.reserved_bytes == 6 * slab
    assert arena.grown_ahead >= 1
    # frees make room: no growth while older slabs have free slots
    for b in bufs[:8]:
        pool.free(b)
    for _ in range(8):
        assert pool.allocate() is not None
    assert arena.wait_growth(30)
    assert arena.reserved_bytes == 6 * slab


def test_never_exceeds_cap_with_concurrent_allocations() -> None:
    cap = (10 << 20) + (512 << 10)  # not a whole number of slabs
    arena = HostArena(cap, pinned=False, slab_bytes=2 << 20)
    pools = [arena.pool(1 << 20), arena.pool(512 << 10)]
    got: list[object] = []
    lock = threading.Lock()
    peak = [0]

    def work(i: int) -> None:
        for _ in range(40):
            buf = pools[i % 2].allocate()
            with lock:
                peak[0] = max(peak[0], arena.reserved_bytes)
                if buf is not None:
                    got.append(buf)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert arena.wait_growth(30)
    assert peak[0] <= cap and arena.reserved_bytes <= cap
    used = sum(b.pool.slot_bytes for b in got)  # type: ignore[attr-defined]
    assert used <= cap
    assert len({(b.pool.slot_bytes, b.data.data_ptr()) for b in got}) == len(got)  # type: ignore[attr-defined]
    # the budget is fully used: nothing is left stranded in half-grown slabs
    assert cap - used < 1 << 20


def test_slots_come_from_slabs_not_per_chunk_allocations() -> None:
    arena = HostArena(64 << 20, pinned=False, slab_bytes=8 << 20)
    pool = arena.pool(1 << 20)
    bufs = [pool.allocate() for _ in range(16)]
    assert all(b is not None for b in bufs)
    assert 16 << 20 <= arena.reserved_bytes <= 24 << 20  # two 8 MiB slabs (and the next, grown ahead)
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


def test_a_reused_slot_comes_back_with_its_view_built_once() -> None:
    arena = HostArena(4 << 20, pinned=False, slab_bytes=2 << 20)
    pool = arena.pool(1 << 20)
    buf = pool.allocate()
    assert buf is not None
    view = buf.view(torch.bfloat16, (4, 128, 1024))
    view.fill_(2.0)
    pool.free(buf)
    again = pool.allocate()
    assert again is buf and again.view(torch.bfloat16, (4, 128, 1024)) is view
    assert torch.all(again.data.view(torch.bfloat16) == 2.0)  # the same bytes, not a copy
    other = again.view(torch.float32, (2, 128, 1024))  # another layout is a new view of them
    assert other is not view and other.data_ptr() == view.data_ptr()
    pool.free(again)
    assert pool.release_empty_slabs() >= 2 << 20  # (with the slab grown ahead)
    fresh = [pool.allocate() for _ in range(2)]  # a slab attached again: buffers of its own
    assert all(b is not None and b is not buf for b in fresh)


def test_may_allocate_is_false_exactly_when_allocate_would_fail_at_once() -> None:
    arena = HostArena(2 << 20, pinned=False, slab_bytes=1 << 20)
    pool = arena.pool(1 << 20)
    assert pool.may_allocate()  # room in the budget
    bufs = [pool.allocate(), pool.allocate()]
    assert arena.wait_growth(30) and all(b is not None for b in bufs)
    assert not pool.may_allocate() and pool.allocate() is None  # full: a cache evicts instead
    pool.free(bufs[0])
    assert pool.may_allocate()  # a free slot
    assert pool.allocate() is bufs[0]
    other = arena.pool(1 << 19)
    assert not other.may_allocate()  # no room for another size either
    pool.free(bufs[1])
    pool.release_empty_slabs()
    assert other.may_allocate() and other.allocate() is not None  # a spare slab to take


def test_views_keep_bytes() -> None:
    arena = HostArena(1 << 20, pinned=False)
    buf = arena.pool(4096).allocate()
    assert buf is not None
    v = buf.view(torch.bfloat16, (4, 2, 64))
    v.fill_(1.5)
    assert torch.all(buf.view(torch.bfloat16, (512,)) == 1.5)


def test_a_view_larger_than_its_slot_is_refused() -> None:
    """The next slot holds another chunk: a view past this one's end would read or write it."""
    arena = HostArena(1 << 20, pinned=False)
    buf = arena.pool(4096).allocate()
    assert buf is not None
    with pytest.raises(ValueError, match="does not fit its 4096-byte slot"):
        buf.view(torch.bfloat16, (5, 2, 256))
    assert buf.view(torch.bfloat16, (4, 2, 256)).numel() == 2048


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


def test_reclaim_takes_back_a_slab_grown_ahead() -> None:
    arena = HostArena(8 << 20, pinned=False, slab_bytes=4 << 20)
    small = arena.pool(1 << 20)
    bufs = [small.allocate() for _ in range(4)]
    assert all(b is not None for b in bufs)
    assert arena.wait_growth(30)
    assert arena.reserved_bytes == 8 << 20  # the second slab, grown ahead and still empty
    big = arena.pool(4 << 20)
    assert big.allocate() is None
    assert arena.reclaim(keep=big) == 4 << 20
    assert big.allocate() is not None
    assert arena.reserved_bytes == 8 << 20


def test_failed_allocation_ahead_gives_the_budget_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty = torch.empty
    failures = []

    def empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "lmcache-slab-ahead":
            failures.append(1)
            raise RuntimeError("out of pinned memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    arena = HostArena(8 << 20, pinned=False, slab_bytes=4 << 20)
    pool = arena.pool(1 << 20)
    assert pool.allocate() is not None
    assert arena.wait_growth(30)
    assert failures and arena.reserved_bytes == 4 << 20
    # the store path grows by itself when the slab grown ahead did not come
    bufs = [pool.allocate() for _ in range(7)]
    assert all(b is not None for b in bufs)
    assert arena.reserved_bytes == 8 << 20
    assert pool.allocate() is None


@pytest.mark.gpu
def test_pinned_slabs_copy_asynchronously_and_are_given_back() -> None:
    arena = HostArena(32 << 20, pinned=True, slab_bytes=8 << 20)
    pool = arena.pool(1 << 20)
    bufs = [pool.allocate() for _ in range(12)]
    assert all(b is not None and b.data.is_pinned() for b in bufs)
    src = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda")
    for b in bufs:
        b.data.copy_(src, non_blocking=True)  # type: ignore[union-attr]
    torch.cuda.synchronize()
    assert all(torch.equal(b.data.cuda(), src) for b in bufs)  # type: ignore[union-attr]
    assert arena.wait_growth(30)
    for b in bufs:
        pool.free(b)  # type: ignore[arg-type]
    del bufs, b
    released = arena.reclaim(keep=arena.pool(4 << 20))
    # Emptied slabs stay pinned, as spares for any chunk size.
    assert released >= 16 << 20 and arena.spare_bytes == released
    big = arena.pool(4 << 20).allocate()
    assert big is not None and big.data.is_pinned()


def test_negative_cap_refused() -> None:
    with pytest.raises(ValueError):
        HostArena(-1)


def test_prepin_takes_the_whole_budget_in_the_background_as_spares() -> None:
    slab = 4 << 20
    arena = HostArena((5 * slab) + (1 << 20), pinned=False, slab_bytes=slab)
    arena.prepin()
    assert arena.wait_prepinned(30)
    assert arena.reserved_bytes == arena.spare_bytes == 5 * slab  # whole slabs only, never above the cap
    pool = arena.pool(1 << 20)
    bufs = [pool.allocate() for _ in range(8)]
    assert all(b is not None for b in bufs)
    assert arena.wait_growth(30)
    assert arena.reserved_bytes == 5 * slab  # the pool grew from the spares, nothing new allocated
    assert arena.spare_bytes < 5 * slab


def test_a_pool_waits_for_the_next_prepinned_slab_instead_of_failing(monkeypatch) -> None:
    slab = 2 << 20
    gate, first_done = threading.Event(), threading.Event()
    real = memory.allocate_slab
    calls = []

    def slow(nbytes: int, pinned: bool, **kw: object) -> torch.Tensor:
        calls.append(nbytes)
        if len(calls) == 2:  # the second prepinned slab takes its time
            first_done.set()
            assert gate.wait(30)
        return real(nbytes, pinned, **kw)

    monkeypatch.setattr(memory, "allocate_slab", slow)
    arena = HostArena(2 * slab, pinned=False, slab_bytes=slab)
    arena.prepin()
    assert first_done.wait(30)
    pool = arena.pool(1 << 20)
    got = [pool.allocate(), pool.allocate()]  # the first slab's two slots
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(pool.allocate()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not result  # the budget is on its way: wait, do not give up
    gate.set()
    waiter.join(30)
    assert result and result[0] is not None and all(got)
    assert arena.reserved_bytes == 2 * slab


def test_empty_slabs_go_back_to_the_spares() -> None:
    slab = 2 << 20
    arena = HostArena(2 * slab, pinned=False, slab_bytes=slab)
    arena.prepin()
    assert arena.wait_prepinned(30)
    small, large = arena.pool(1 << 20), arena.pool(2 << 20)
    bufs = [small.allocate() for _ in range(4)]
    assert large.allocate() is None  # all memory is the small size's
    for b in bufs[:2]:
        small.free(b)
    assert arena.reclaim(keep=large) == slab  # one slab emptied: a spare again, still allocated
    assert large.allocate() is not None and arena.reserved_bytes == 2 * slab


def test_arena_slabs_scale_with_a_small_cap() -> None:
    assert HostArena(512 << 20).slab_bytes == 64 << 20
    assert HostArena(5 << 30).slab_bytes == 256 << 20
    assert HostArena(20 << 20).slab_bytes == 4 << 20


def test_a_refused_slab_on_the_store_path_shrinks_the_budget_instead_of_failing(monkeypatch) -> None:
    arena = HostArena(16 << 20, pinned=False, slab_bytes=4 << 20)
    pool = arena.pool(1 << 20)
    first = [pool.allocate() for _ in range(4)]
    assert all(b is not None for b in first) and arena.wait_growth(30)

    def refuse(nbytes: int, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arena.source, "allocate", refuse)
    more = [pool.allocate() for _ in range(4)]  # the slab grown ahead before the refusals
    assert all(b is not None for b in more)
    assert pool.allocate() is None  # no room and no error: L1 is full at what it holds
    assert arena.capacity_bytes == arena.reserved_bytes == 8 << 20
    pool.free(more[0])
    assert pool.allocate() is not None  # freed slots are served as before


def test_huge_page_memory_is_zeroed_writable_and_outlives_its_mapping_name() -> None:
    """The memory a pinned slab is made of (huge pages where the kernel allows): fresh zeros, as many
    bytes as asked, writable through the tensor, which alone keeps the mapping alive."""
    tensor = host_slabs.huge_page_memory(4 << 20)
    assert tensor.dtype == torch.uint8 and tensor.numel() == 4 << 20
    assert int(tensor.count_nonzero()) == 0
    view = tensor[1 << 20 :]
    del tensor
    gc.collect()
    view.fill_(7)
    assert int(view.sum()) == 7 * (3 << 20)


class _PinnedLooking(memory.SlabSource):
    """A source that says its slabs are page-locked (what decides whether its threads relax their CUDA
    graph capture mode) and hands out ordinary memory."""

    def __init__(self) -> None:
        super().__init__(pinned=True)

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
    ) -> memory.Slab:
        return self._track(memory.Slab(self.new_id(), torch.zeros(nbytes, dtype=torch.uint8)))


def test_threads_that_page_lock_in_the_background_relax_their_capture_mode(monkeypatch) -> None:
    """TRT-LLM captures its CUDA graphs (global mode) while L1 is still being page-locked: every thread
    that page-locks must first relax its capture mode, or its call fails and breaks that capture; and
    it works on the device of the thread that started it, not on device 0 (a rank's own GPU)."""
    relaxed: list[str] = []

    def relax(device: int | None = None) -> bool:
        assert device == 3, f"{threading.current_thread().name} was handed device {device}, not its starter's"
        relaxed.append(threading.current_thread().name)
        return True

    monkeypatch.setattr(memory.cudart, "relax_capture_mode", relax)
    monkeypatch.setattr(memory.cudart, "current_device", lambda: 3)
    slab = 2 << 20
    arena = HostArena(3 * slab, slab_bytes=slab, source=_PinnedLooking())
    arena.prepin()
    assert arena.wait_prepinned(30)
    assert sorted(set(relaxed)) == sorted(f"lmcache-prepin-{i}" for i in range(memory.PREPIN_THREADS))
    relaxed.clear()
    grown = HostArena(3 * slab, slab_bytes=slab, source=_PinnedLooking())
    pool = grown.pool(slab)
    assert pool.allocate() is not None  # the first slab on this thread, the next one ahead
    assert grown.wait_growth(30)
    assert relaxed == ["lmcache-slab-ahead"]
    unpinned = HostArena(3 * slab, pinned=False, slab_bytes=slab)
    unpinned.prepin()
    assert unpinned.wait_prepinned(30) and relaxed == ["lmcache-slab-ahead"]  # no CUDA call, nothing to relax
