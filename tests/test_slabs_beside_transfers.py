"""Which way L1's slabs are page-locked: registration until transfers begin or while a pool waits for
memory, the CUDA driver's own host memory beside transfers (lmcache.memory, D80)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from lmcache import driver_host_memory, host_slabs, memory, page_locking
from lmcache.memory import HostArena

SLAB = 1 << 20


class _Recording(memory.SlabSource):
    """Says its slabs are page-locked, hands out ordinary memory and records how each was asked for;
    the allocations numbered ``held`` (from 0) wait for their ``release`` event."""

    def __init__(self, *held: int) -> None:
        super().__init__(pinned=True)
        self.asked: list[bool] = []
        self.abandoned: list[int] = []
        self.answered = threading.Event()
        self.release = {number: threading.Event() for number in held}
        self._lock = threading.Lock()

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
    ) -> memory.Slab:
        with self._lock:
            number = len(self.asked)
            self.asked.append(beside_transfers)
        if number in self.release:
            assert self.release[number].wait(30)
        if abandon is not None:  # asked where page-locking asks it last: at the registration's turn
            given_up = abandon()
            self.answered.set()
            if given_up:
                self.abandoned.append(number)
                raise page_locking.PageLockingAbandoned
        return self._track(memory.Slab(self.new_id(), torch.zeros(nbytes, dtype=torch.uint8)))


def _recorded_registrations(monkeypatch) -> list[int]:
    """Page-locking by registration stood in for: the sizes it was asked for, in order."""
    registered: list[int] = []

    def register(tensor: torch.Tensor, **_: object) -> bool:
        registered.append(tensor.numel())
        return True

    monkeypatch.setattr(host_slabs, "pin_in_place", register)
    return registered


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_slabs_pinned_before_any_transfer_are_registered(monkeypatch) -> None:
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    source = _Recording()
    arena = HostArena(4 * SLAB, slab_bytes=SLAB, source=source)
    arena.prepin()
    assert arena.wait_prepinned(30)
    assert source.asked == [False] * 4 and not arena.serving


def test_once_a_slot_was_handed_out_background_slabs_are_made_beside_transfers(monkeypatch) -> None:
    """The first slot's slab is made on the caller's thread, which waits for it: registration, the
    faster way. The slab grown ahead and the rest pinned meanwhile are made beside transfers."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    source = _Recording()
    arena = HostArena(4 * SLAB, slab_bytes=SLAB, source=source)
    pool = arena.pool(SLAB)
    assert pool.allocate() is not None and arena.serving
    assert arena.wait_growth(30)
    arena.prepin()
    assert arena.wait_prepinned(30)
    assert source.asked == [False, True, True, True]


def test_a_registration_begun_before_transfers_gives_way_once_they_begin(monkeypatch) -> None:
    """A slab pre-pinning started to register before the first slot was handed out is given up once it
    was (registration would hold up the first saves' copies), its budget made again by the driver."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    monkeypatch.setattr(memory, "PREPIN_THREADS", 1)
    source = _Recording(0)
    arena = HostArena(3 * SLAB, slab_bytes=SLAB, source=source)
    arena.prepin()
    _until(lambda: len(source.asked) == 1)  # pre-pinning's first slab, being registered, held
    pool = arena.pool(SLAB)
    assert pool.allocate() is not None and arena.serving  # its slab made on this thread, one grown ahead
    source.release[0].set()
    assert arena.wait_prepinned(30) and arena.wait_growth(30)
    assert source.abandoned == [0]
    assert sorted(source.asked) == [False, False, True, True] and source.asked[:2] == [False, False]
    assert arena.reserved_bytes == 3 * SLAB and arena.spare_bytes == SLAB


def test_a_registration_begun_while_a_pool_waited_goes_on_once_the_wait_ends(monkeypatch) -> None:
    """Only a slab begun before transfers gives way: one begun because a pool waited for memory is
    kept when the wait ends (pools waiting on and off would restart its page-locking again and again)."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    monkeypatch.setattr(memory, "PREPIN_THREADS", 1)
    source = _Recording(1, 2)  # the slab grown ahead of the first slot's, and pre-pinning's
    arena = HostArena(3 * SLAB, slab_bytes=SLAB, source=source)
    pool = arena.pool(SLAB)
    assert pool.allocate() is not None  # one slot per slab: the next is grown ahead, and held
    _until(lambda: len(source.asked) == 2)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.allocate()))
    waiter.start()
    _until(lambda: arena.waiting == 1)
    arena.prepin()  # the last slab of the budget, registered: a pool waits
    _until(lambda: len(source.asked) == 3)
    source.release[1].set()  # the wait ends
    waiter.join(30)
    assert got and got[0] is not None and arena.waiting == 0
    source.release[2].set()
    assert arena.wait_prepinned(30) and arena.wait_growth(30)
    assert source.asked == [False, True, False] and source.abandoned == []


def test_a_registration_before_any_transfer_goes_on_and_asking_takes_no_lock(monkeypatch) -> None:
    """Before the first slot is handed out a slab being registered is kept. The question is asked inside
    the page-locking gate's turns, which a pool growing under the arena's lock may wait for: answering
    it must not take that lock."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    monkeypatch.setattr(memory, "PREPIN_THREADS", 1)
    source = _Recording(0)
    arena = HostArena(2 * SLAB, slab_bytes=SLAB, source=source)
    arena.prepin()
    _until(lambda: len(source.asked) == 1)
    with arena.lock:  # held throughout: the answer must come without it
        source.release[0].set()
        assert source.answered.wait(30)
    assert arena.wait_prepinned(30)
    assert source.asked == [False, False] and source.abandoned == []


def test_while_a_pool_waits_for_memory_background_slabs_are_registered(monkeypatch) -> None:
    """A store waiting for a slab waits anyway: the faster way goes then, holding up nothing more."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    source = _Recording(1)  # the slab grown ahead of the first slot's waits
    arena = HostArena(3 * SLAB, slab_bytes=SLAB, source=source)
    pool = arena.pool(SLAB)
    first = pool.allocate()  # one slot per slab: the next is grown ahead, and held
    assert first is not None
    _until(lambda: len(source.asked) == 2)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.allocate()))
    waiter.start()
    _until(lambda: arena.waiting == 1)
    arena.prepin()  # the last slab of the budget, started while the pool waits
    _until(lambda: len(source.asked) == 3)
    source.release[1].set()
    waiter.join(30)
    assert arena.wait_prepinned(30) and arena.wait_growth(30)
    assert source.asked == [False, True, False]
    assert got and got[0] is not None and arena.waiting == 0


def test_driver_made_memory_is_used_where_the_driver_makes_it(monkeypatch) -> None:
    made = torch.zeros(SLAB, dtype=torch.uint8)

    class Maker:
        def allocate(self, nbytes: int) -> torch.Tensor:
            assert nbytes == SLAB
            return made

    monkeypatch.setattr(driver_host_memory, "maker", lambda device: Maker())
    registered = _recorded_registrations(monkeypatch)
    assert host_slabs.allocate_slab(SLAB, True, beside_transfers=True) is made and registered == []
    other = host_slabs.allocate_slab(SLAB, True)
    assert other is not made and registered == [SLAB]


def test_the_driver_makes_memory_in_turn_with_page_locking(monkeypatch) -> None:
    """No page is faulted in (nor memory registered) while the driver makes a slab: interleaved, each
    holds the other up, and the copies enqueued meanwhile wait for both."""
    entered = threading.Event()

    def fault() -> None:
        with page_locking.GATE.faulting():
            entered.set()

    faulter = threading.Thread(target=fault)

    class Maker:
        def allocate(self, nbytes: int) -> torch.Tensor:
            faulter.start()
            assert not entered.wait(0.05), "a piece was faulted in while the driver made a slab"
            return torch.zeros(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(driver_host_memory, "maker", lambda device: Maker())
    assert host_slabs.allocate_slab(SLAB, True, beside_transfers=True).numel() == SLAB
    assert entered.wait(30)  # the turn passed on once the slab was made
    faulter.join(30)


def test_without_a_driver_maker_slabs_beside_transfers_are_registered(monkeypatch) -> None:
    monkeypatch.setattr(driver_host_memory, "maker", lambda device: None)
    registered = _recorded_registrations(monkeypatch)
    slab = host_slabs.allocate_slab(SLAB, True, beside_transfers=True)
    assert slab.numel() == SLAB and registered == [SLAB]


def test_a_driver_refusal_falls_back_to_registration(monkeypatch) -> None:
    class Refusing:
        def allocate(self, nbytes: int) -> torch.Tensor:
            raise driver_host_memory.DriverMemoryError("cuMemCreate failed (CUDA error 2)")

    monkeypatch.setattr(driver_host_memory, "maker", lambda device: Refusing())
    registered = _recorded_registrations(monkeypatch)
    assert host_slabs.allocate_slab(SLAB, True, beside_transfers=True).numel() == SLAB
    assert registered == [SLAB]


def test_no_maker_without_a_cuda_device() -> None:
    assert driver_host_memory.maker(None) is None
    if not torch.cuda.is_available():
        assert driver_host_memory.maker(0) is None


def test_the_driver_makes_one_slab_at_a_time(monkeypatch) -> None:
    """Beside transfers the pre-pinning threads take turns (the driver serializes them anyway), so a
    pool that starts waiting finds them free to register, not queued inside the driver."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    in_flight, most = [0], [0]
    lock = threading.Lock()

    class Slow(_Recording):
        def allocate(
            self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
        ) -> memory.Slab:
            with lock:
                in_flight[0] += beside_transfers
                most[0] = max(most[0], in_flight[0])
            time.sleep(0.01)  # long enough for every thread to be asking at once
            with lock:
                in_flight[0] -= beside_transfers
            return super().allocate(nbytes, beside_transfers=beside_transfers, abandon=abandon)

    source = Slow()
    arena = HostArena(12 * SLAB, slab_bytes=SLAB, source=source)
    assert arena.pool(SLAB).allocate() is not None
    arena.prepin()
    assert arena.wait_prepinned(30) and arena.wait_growth(30)
    assert most[0] == 1 and source.asked.count(True) == 11


def test_pools_waiting_together_do_not_wake_each_other(monkeypatch) -> None:
    """A pool starting to wait wakes the threads waiting for the driver's turn only when it is the
    first: each waking the others would keep every waiting pool spinning through its loop."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    source = _Recording(1)
    arena = HostArena(2 * SLAB, slab_bytes=SLAB, source=source)
    pool = arena.pool(SLAB)
    assert pool.allocate() is not None  # the next slab is grown ahead, and held
    looks = [0]
    growing = HostArena.growing

    def counted(self: HostArena) -> memory.SlotPool | None:
        looks[0] += 1  # once per turn of a waiting pool's loop
        return growing.fget(self)

    monkeypatch.setattr(HostArena, "growing", property(counted))
    waiters = [threading.Thread(target=pool.allocate) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    _until(lambda: arena.waiting == 3)
    time.sleep(0.05)  # spinning waiters would loop thousands of times meanwhile
    assert looks[0] <= 9
    source.release[1].set()
    for waiter in waiters:
        waiter.join(30)


def test_memory_that_is_not_page_locked_takes_no_turns() -> None:
    arena = HostArena(4 * SLAB, pinned=False, slab_bytes=SLAB)
    assert arena.pool(SLAB).allocate() is not None and arena.serving
    arena.prepin()
    assert arena.wait_prepinned(30) and arena.wait_growth(30)
    with arena.lock:
        assert not arena.beside_transfers


class _InFlight(_Recording):
    """Records the most allocations in flight at once; ``during(number)`` runs inside each (numbered
    from 0 in the order they began)."""

    def __init__(self, during: Callable[[int], object]) -> None:
        super().__init__()
        self.most = 0
        self._in_flight = 0
        self._began = 0
        self._during = during
        self._counting = threading.Lock()

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
    ) -> memory.Slab:
        with self._counting:
            self._in_flight += 1
            self.most = max(self.most, self._in_flight)
            number, self._began = self._began, self._began + 1
        self._during(number)
        with self._counting:
            self._in_flight -= 1
        return super().allocate(nbytes, beside_transfers=beside_transfers, abandon=abandon)


def test_driver_made_slabs_are_made_one_at_a_time_from_the_start(monkeypatch) -> None:
    """A source whose slabs the driver makes takes turns before any transfer too (a worker importing
    one waits behind every making queued)."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    monkeypatch.setattr(memory, "PREPIN_THREADS", 4)
    source = _InFlight(lambda number: time.sleep(0.01))  # long enough for every thread to be asking
    source.driver_made = True
    arena = HostArena(12 * SLAB, slab_bytes=SLAB, source=source)
    arena.prepin()
    assert arena.wait_prepinned(30)
    assert not arena.serving and source.most == 1 and len(source.asked) == 12
    assert source.asked == [False] * 12  # made before any transfer: not "beside" them


def test_slabs_not_all_driver_made_are_made_at_once_before_transfers(monkeypatch) -> None:
    """The same arena over a source that registers: its pre-pinning threads run side by side."""
    monkeypatch.setattr(memory.cudart, "relax_capture_mode", lambda device=None: True)
    monkeypatch.setattr(memory, "PREPIN_THREADS", 4)
    everyone = threading.Barrier(4)
    source = _InFlight(lambda number: number < 4 and everyone.wait(30))  # the first four end together
    arena = HostArena(8 * SLAB, slab_bytes=SLAB, source=source)
    arena.prepin()
    assert arena.wait_prepinned(30)
    assert source.most == 4
