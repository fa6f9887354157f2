"""Page-locking L1 in the background without stopping the rest of the process (benchmarks/RESULTS.md,
D65, :mod:`lmcache.page_locking`): faulting in and registering take turns, registrations alone, and
faulting holds no GIL (the driver itself is exercised on the GPU: tests/test_cuda.py)."""

import contextlib
import gc
import mmap
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmcache import cudart, page_locking, shm_slabs
from lmcache.page_locking import PageLockGate
from lmcache.shm_slabs import ShmSlabSource


def _entered(gate_use: Any) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A thread inside ``gate_use()`` until released: (thread, entered, release)."""
    entered, release = threading.Event(), threading.Event()

    def run() -> None:
        with gate_use():
            entered.set()
            assert release.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, entered, release


# A thread kept out by the gate never enters: waiting 0.3 s for it cannot fail the test falsely, and
# one let in wrongly gets in within it.
KEPT_OUT_S = 0.3


def test_a_registration_waits_for_the_faulting_in_progress_and_goes_alone() -> None:
    gate = PageLockGate()
    faulting, faulting_in, end_faulting = _entered(gate.faulting)
    assert faulting_in.wait(10)
    also_faulting, also_in, end_also = _entered(gate.faulting)  # several fault at once
    assert also_in.wait(10)
    registering, registering_in, end_registering = _entered(gate.registering)
    assert not registering_in.wait(KEPT_OUT_S)
    late, late_in, end_late = _entered(gate.faulting)  # a waiting registration goes first
    assert not late_in.wait(KEPT_OUT_S)
    end_faulting.set()
    end_also.set()
    assert registering_in.wait(10)
    other, other_in, end_other = _entered(gate.registering)  # one registration at a time
    assert not other_in.wait(KEPT_OUT_S)
    assert not late_in.is_set()
    end_registering.set()
    assert other_in.wait(10) or late_in.wait(10)
    end_other.set()
    assert late_in.wait(10)
    end_late.set()
    for thread in (faulting, also_faulting, registering, late, other):
        thread.join(10)
        assert not thread.is_alive()


def test_page_locking_faults_in_pieces_then_registers_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pin_in_place``: every piece faulted through the gate, then one registration of the whole."""
    calls: list[tuple[str, int, int]] = []

    class Gate(PageLockGate):
        @contextlib.contextmanager
        def faulting(self) -> Iterator[None]:
            calls.append(("fault", 0, 0))
            yield

        @contextlib.contextmanager
        def registering(self) -> Iterator[None]:
            calls.append(("register", 0, 0))
            yield

    monkeypatch.setattr(page_locking, "GATE", Gate())
    monkeypatch.setattr(page_locking, "FAULT_PIECE_BYTES", 1 << 20)
    monkeypatch.setattr(
        cudart, "register_host", lambda address, nbytes: calls.append(("cuda", address, nbytes)) or 0
    )
    monkeypatch.setattr(cudart, "unregister_host", lambda address: None)
    region = mmap.mmap(-1, (3 << 20) + 4096)  # page-aligned, as slabs are
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    assert page_locking.pin_in_place(tensor)
    assert calls == [("fault", 0, 0)] * 4 + [("register", 0, 0), ("cuda", tensor.data_ptr(), tensor.numel())]


@pytest.mark.parametrize("answers_before_giving_up", [2, 3])
def test_page_locking_given_up_registers_nothing(
    monkeypatch: pytest.MonkeyPatch, answers_before_giving_up: int
) -> None:
    """``abandon`` is asked before each piece is faulted and once the registration's turn has come:
    saying True there (after two pieces; after all three, at the registration) stops it with nothing
    registered, and the gate's turns are passed on."""
    asked: list[int] = []
    registered: list[int] = []
    monkeypatch.setattr(page_locking, "FAULT_PIECE_BYTES", 1 << 20)
    monkeypatch.setattr(cudart, "register_host", lambda address, nbytes: registered.append(nbytes) or 0)
    monkeypatch.setattr(cudart, "unregister_host", lambda address: None)
    region = mmap.mmap(-1, 3 << 20)
    tensor = torch.frombuffer(region, dtype=torch.uint8)

    def abandon() -> bool:
        asked.append(len(asked))
        return len(asked) > answers_before_giving_up

    with pytest.raises(page_locking.PageLockingAbandoned):
        page_locking.pin_in_place(tensor, abandon=abandon)
    assert len(asked) == answers_before_giving_up + 1 and registered == []
    # Neither of the gate's turns was left held: page-locking again goes through both.
    done: list[bool] = []
    again = threading.Thread(
        target=lambda: done.append(page_locking.pin_in_place(tensor, abandon=lambda: False))
    )
    again.start()
    again.join(10)
    assert done == [True] and registered == [3 << 20]


def test_register_without_a_runtime_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cudart, "runtime", lambda: None)
    with pytest.raises(RuntimeError, match="needs a CUDA runtime"):
        cudart.register_host(4096, 4096)


def _shm_region(nbytes: int) -> mmap.mmap:
    path = os.path.join("/dev/shm", f"lmcache-test-populate-{os.getpid()}-{time.monotonic_ns()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def test_populate_keeps_the_contents() -> None:
    region = _shm_region(8 << 20)
    region[:4] = b"kv!!"
    region[-4:] = b"tail"
    view = torch.frombuffer(region, dtype=torch.uint8)
    assert page_locking.populate(view.data_ptr(), view.numel())
    assert bytes(region[:4]) == b"kv!!" and bytes(region[-4:]) == b"tail"
    del view
    region.close()


def test_populate_lets_other_threads_run() -> None:
    """While one thread faults a large region in, another keeps running Python (CPython's own
    ``mmap.madvise`` would hold the GIL throughout: not one tick in the middle of the call)."""
    nbytes = 512 << 20
    region = _shm_region(nbytes)
    view = torch.frombuffer(region, dtype=torch.uint8)
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    ticker = threading.Thread(target=tick)
    ticker.start()
    while not ticks:  # the ticker runs before the call starts
        time.sleep(0.001)
    began = time.perf_counter()
    assert page_locking.populate(view.data_ptr(), nbytes)
    ended = time.perf_counter()
    stop.set()
    ticker.join(10)
    quarter = (ended - began) / 4
    assert any(began + quarter < t < ended - quarter for t in ticks), (
        f"no other thread ran during the middle half of a {ended - began:.3f} s populate"
    )
    del view
    region.close()


def test_a_worker_faults_a_slab_in_before_page_locking_it(monkeypatch: pytest.MonkeyPatch) -> None:
    source = ShmSlabSource(pinned=False)
    try:
        slab = source.allocate(4 << 20)
        info = source.describe(slab.id)
        assert info is not None
        order: list[str] = []
        monkeypatch.setattr(shm_slabs, "populate", lambda address, nbytes: order.append("populate") or True)

        def pin(tensor: torch.Tensor, *, fault_in: bool) -> bool:
            order.append(f"pin, fault in: {fault_in}")
            return True

        monkeypatch.setattr(shm_slabs, "pin_in_place", pin)
        mapped = shm_slabs.map_slab(info, pin=True)
        assert mapped.pinned and order == ["populate", "pin, fault in: False"]
        order.clear()
        assert not shm_slabs.map_slab(info, pin=False).pinned and order == []
    finally:
        source.close()


def test_memory_stays_page_locked_while_a_view_of_it_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies run from views of a slab: dropping the slab's own tensor object while a view is still
    in use must not unregister the memory under that view; the last view's end does."""
    unregistered: list[int] = []
    monkeypatch.setattr(cudart, "register_host", lambda address, nbytes: 0)
    monkeypatch.setattr(cudart, "unregister_host", unregistered.append)
    region = mmap.mmap(-1, 1 << 20)
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    address = tensor.data_ptr()
    assert page_locking.pin_in_place(tensor, fault_in=False)
    rows = tensor[4096:].view(torch.float16).view(-1, 64)
    del tensor
    gc.collect()
    assert unregistered == [] and rows.data_ptr() == address + 4096
    del rows
    gc.collect()
    assert unregistered == [address]
