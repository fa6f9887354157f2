"""Page-locking L1 in the background without stopping the rest of the process (benchmarks/RESULTS.md,
D65): registrations go one at a time (on a fake CUDA runtime here; the real one on the GPU:
tests/test_cuda.py), and a worker faults a server slab's pages in without holding the GIL."""

import mmap
import os
import threading
import time
from typing import Any

import pytest
import torch

from lmcache import cudart, shm_slabs
from lmcache.shm_slabs import ShmSlabSource


class BlockingRuntime:
    """``cudaHostRegister`` records each call and, for the first, waits until told to return."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.first_entered = threading.Event()
        self.second_entered = threading.Event()
        self.release_first = threading.Event()
        self.unregistered: list[int] = []

    def cudaHostRegister(self, address: Any, nbytes: Any, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.calls.append((address.value, nbytes.value))
        if len(self.calls) == 1:
            self.first_entered.set()
            assert self.release_first.wait(10)
        else:
            self.second_entered.set()
        return 0

    def cudaHostUnregister(self, address: Any) -> int:  # noqa: N802
        self.unregistered.append(address.value)
        return 0


def test_registrations_of_two_threads_go_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BlockingRuntime()
    monkeypatch.setattr(cudart, "runtime", lambda: fake)
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(cudart.register_host(4096, 1 << 20)))
    second = threading.Thread(target=lambda: results.append(cudart.register_host(8192, 2 << 20)))
    first.start()
    assert fake.first_entered.wait(10)
    second.start()
    # Inside the driver the first holds the lock: the second must not get in meanwhile (without
    # the lock it does at once).
    assert not fake.second_entered.wait(0.3)
    fake.release_first.set()
    first.join(10)
    second.join(10)
    assert fake.second_entered.is_set()
    assert fake.calls == [(4096, 1 << 20), (8192, 2 << 20)]
    assert results == [0, 0]


def test_unregistering_does_not_wait_for_a_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slab's finalizer may run on a thread that is registering another (its lock held)."""
    fake = BlockingRuntime()
    monkeypatch.setattr(cudart, "runtime", lambda: fake)
    registering = threading.Thread(target=cudart.register_host, args=(4096, 1 << 20))
    registering.start()
    assert fake.first_entered.wait(10)
    cudart.unregister_host(1 << 30)
    assert fake.unregistered == [1 << 30]
    fake.release_first.set()
    registering.join(10)


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
    assert shm_slabs.populate(view.data_ptr(), view.numel())
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
    assert shm_slabs.populate(view.data_ptr(), nbytes)
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

        def pin(tensor: torch.Tensor, *, fault_in: str) -> bool:
            order.append(f"pin {fault_in}")
            return True

        monkeypatch.setattr(shm_slabs, "pin_in_place", pin)
        mapped = shm_slabs.map_slab(info, pin=True)
        assert mapped.pinned and order == ["populate", "pin none"]
        order.clear()
        assert not shm_slabs.map_slab(info, pin=False).pinned and order == []
    finally:
        source.close()
