"""Host memory the CUDA driver makes (lmcache.driver_host_memory) on a real device: the CPU reads and
writes it, copies to and from the device are exact, and an engine whose L1 slabs are made that way
stores and loads bit for bit."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from lmcache import driver_host_memory, host_slabs, memory
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.gpu


def test_driver_made_memory_is_host_memory_the_device_copies_to_and_from() -> None:
    maker = driver_host_memory.maker(torch.cuda.current_device())
    assert maker is not None, "this driver makes no host-NUMA memory"
    nbytes = (8 << 20) + 3  # not a multiple of the granularity
    host = maker.allocate(nbytes)
    assert host.device.type == "cpu" and host.numel() == nbytes
    host.fill_(5)
    assert int(host[-1]) == 5
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)
        back = torch.empty_like(source)
        back.copy_(host, non_blocking=True)
    stream.synchronize()
    assert torch.equal(host, source.cpu()) and torch.equal(back, source)


def test_memory_imported_for_the_device_alone_takes_its_copies_both_ways() -> None:
    """A CUDA pool's worker imports the server's slabs without CPU access (``cpu_access=False``): the
    device's copies into and out of the import are exact and seen by the maker's CPU mapping."""
    import os

    maker = driver_host_memory.maker(torch.cuda.current_device())
    assert maker is not None, "this driver makes no host-NUMA memory"
    nbytes = 8 << 20
    made, fd = maker.allocate_shared(nbytes)
    try:
        imported = maker.import_shared(fd, nbytes, cpu_access=False)
    finally:
        os.close(fd)
    made.fill_(7)
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        seen = torch.empty_like(source)
        seen.copy_(imported, non_blocking=True)  # what the maker's CPU wrote
        stream.synchronize()
        assert bool((seen == 7).all())
        imported.copy_(source, non_blocking=True)
    stream.synchronize()
    assert torch.equal(made, source.cpu())  # the device's write, read by the maker's CPU


class _BesideTransfers(memory.SlabSource):
    """Every slab made by the driver (no silent fallback to registration, which would make the test
    below pass without driver-made memory)."""

    def allocate(self, nbytes: int, *, beside_transfers: bool = False) -> memory.Slab:
        tensor = host_slabs.driver_made(nbytes)
        assert tensor is not None, "the driver made no host slab"
        return self._track(memory.Slab(self.new_id(), tensor))


def test_an_engine_on_driver_made_slabs_stores_and_loads_exactly() -> None:
    tpb, tokens = 32, 1024
    pool = torch.randn(2 * tokens // tpb, 4, 2, 2 * tpb * 16, device="cuda").to(torch.bfloat16)
    layout = PoolLayout.of_pool(pool, tpb)
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=256, max_local_cpu_size=0.05)
    engine = CacheEngine(cfg, slab_source=_BesideTransfers(pinned=True))
    space = KeySpace("driver-made", layout)
    toks = list(range(tokens))
    blocks = list(range(0, 2 * tokens // tpb, 2))
    targets = list(range(1, 2 * tokens // tpb, 2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    engine.store(space, 0, pool, BlockTransfer(toks, None, blocks, 0, tokens), stream)
    stream.synchronize()
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, targets, 0, tokens), stream) == tokens
    stream.synchronize()
    assert torch.equal(pool[blocks], pool[targets])


def test_driver_made_memory_goes_back_once_its_last_view_is_collected(monkeypatch) -> None:
    """Only this test's allocation is watched: a collection may release other tests' leftovers."""
    released: list[int] = []
    ours: list[int] = []
    original = driver_host_memory.DriverHostMemory.release

    def recording(self, handle: int, address: int, size: int) -> None:
        if address in ours:
            released.append(size)
        original(self, handle, address, size)

    # Before the allocation: its finalizer holds the method it found then.
    monkeypatch.setattr(driver_host_memory.DriverHostMemory, "release", recording)
    maker = driver_host_memory.maker(torch.cuda.current_device())
    assert maker is not None
    host = maker.allocate(4 << 20)
    ours.append(host.data_ptr())
    view = host[1 << 20 :]
    del host
    gc.collect()
    assert released == []
    view.fill_(1)
    holder = [view]  # another thread drops the last view
    del view
    done = threading.Thread(target=holder.clear)
    done.start()
    done.join()
    gc.collect()
    assert released == [-(-(4 << 20) // maker.granularity) * maker.granularity]
