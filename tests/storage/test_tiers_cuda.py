"""CUDA paths of the tiers: write-behind waits for the store's copy event in the writer thread, and
chunks promoted from disk load back into a CUDA pool. Without CUDA there is nothing to run."""

from pathlib import Path

import pytest
import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.gpu

TPB, CHUNK = 32, 256


def engine(disk: Path) -> CacheEngine:
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, max_local_cpu_size=0.5, local_disk=str(disk), max_local_disk_size=1.0
    )
    engine = CacheEngine(config)
    assert engine.tiers is not None and engine.tiers.tiers[0].wait_scanned(60)  # the disk index is complete
    return engine


def test_write_behind_waits_for_the_copy_and_promotion_loads_to_cuda(tmp_path: Path) -> None:
    pool = torch.randn(96, 4, 2, 2 * TPB * 16, device="cuda").to(torch.bfloat16)
    space = KeySpace("cuda-tier", PoolLayout.of_pool(pool, TPB))
    toks = list(range(1024))
    stream = torch.cuda.Stream()
    first = engine(tmp_path)
    assert first.l1.arena.pinned
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # keep the store's copies queued behind ~0.1 s of GPU work
    assert first.store(space, 0, pool, BlockTransfer(toks, None, list(range(32)), 0, 1024), stream) == 1024
    first.close()  # the writer waited on each chunk's event before reading its bytes
    assert first.snapshot().tier("disk").writes == 4

    second = engine(tmp_path)
    assert second.lookup(space, toks, pin_id="r") == 1024
    dst = list(range(40, 72))
    assert (
        second.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 1024), stream, pin_id="r") == 1024
    )
    stream.synchronize()
    assert torch.equal(pool[dst], pool[:32])
    assert second.snapshot().tier("disk").hits == 4 and second.l1.pinned_keys() == []
    second.close()
