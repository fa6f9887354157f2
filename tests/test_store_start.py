"""A store (or a whole load) given a start prepares every chunk at once and copies only once the start
lets it (D67)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from lmcache.chunk_copy import CopyBatcher, EventStart
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.forward_gate import FORWARD
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.layered_load import LayerReady
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

TPB, CHUNK = 16, 64
TOKENS = list(range(4 * CHUNK))


SOURCE = list(range(16))


def whole(blocks: list[int]) -> BlockTransfer[list[int]]:
    return BlockTransfer(TOKENS, None, blocks, 0, len(TOKENS))


def make(device: str = "cpu") -> tuple[CacheEngine, KeySpace, torch.Tensor]:
    pool = torch.randn(32, 2, 2, TPB * 8, device=device)
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    return CacheEngine(config, pinned=device != "cpu"), KeySpace("model", PoolLayout.of_pool(pool, TPB)), pool


class _Start:
    """Released by the test; records what the store had done when it first waited."""

    def __init__(self, engine: CacheEngine, space: KeySpace) -> None:
        self.engine, self.space = engine, space
        self.opened = threading.Event()
        self.seen: list[tuple[int, int]] = []

    @property
    def released(self) -> bool:
        return self.opened.is_set()

    def wait(self) -> Any:
        self.seen.append((len(self.engine.l1), self.engine.lookup(self.space, TOKENS)))
        assert self.opened.wait(10), "never released"
        return None


def test_a_store_reserves_every_chunk_before_its_first_copy_waits_for_the_start() -> None:
    engine, space, pool = make()
    start = _Start(engine, space)
    stored: list[int] = []
    saver = threading.Thread(
        target=lambda: stored.append(engine.store(space, 0, pool, whole(SOURCE), None, start))
    )
    saver.start()
    saver.join(timeout=0.05)
    assert saver.is_alive(), "the store copied before its start"
    assert engine.lookup(space, TOKENS) == 0
    start.opened.set()
    saver.join(timeout=10)
    assert stored == [len(TOKENS)]
    assert start.seen == [(4, 0)]  # all four chunks reserved, none published, at the one wait
    dst = list(range(16, 32))
    assert engine.retrieve(space, 0, pool, whole(dst)) == len(TOKENS)
    assert torch.equal(pool[16:32], pool[0:16])


def test_a_store_with_a_released_start_copies_as_it_goes() -> None:
    engine, space, pool = make()
    start = _Start(engine, space)
    start.opened.set()
    engine.store(space, 0, pool, whole(SOURCE), None, start)
    assert start.seen == [(1, 0)]  # the first chunk went alone, as without a start (D4)


def test_a_store_of_cached_chunks_never_waits() -> None:
    engine, space, pool = make()
    engine.store(space, 0, pool, whole(SOURCE))
    start = _Start(engine, space)
    assert engine.store(space, 0, pool, whole(SOURCE), None, start) == 0
    assert start.seen == []


def test_a_store_released_late_copies_in_batches_that_let_a_forward_launch_between_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(FORWARD, "max_hold_s", 60.0)  # held until opened, however slow this host
    engine, space, _ = make()
    pool = torch.randn(2 * 16 * CHUNK // TPB, 2, 2, TPB * 8)
    tokens = list(range(16 * CHUNK))  # twice FLUSH_CHUNKS chunks
    start = _Start(engine, space)
    transfer = BlockTransfer(tokens, None, list(range(16 * CHUNK // TPB)), 0, len(tokens))
    saver = threading.Thread(target=lambda: engine.store(space, 0, pool, transfer, None, start))
    saver.start()
    try:
        saver.join(timeout=0.05)
        assert saver.is_alive() and engine.lookup(space, tokens) == 0
        FORWARD.close()  # a forward is being launched when the start comes
        start.opened.set()
        assert FORWARD.wait_for_waiter(timeout=10), "the store did not stop between its batches"
        assert engine.lookup(space, tokens) == CopyBatcher.FLUSH_CHUNKS * CHUNK  # the first batch only
    finally:
        FORWARD.open()
    saver.join(timeout=10)
    assert engine.lookup(space, tokens) == len(tokens)
    dst = list(range(16 * CHUNK // TPB, 2 * 16 * CHUNK // TPB))
    assert engine.retrieve(space, 0, pool, BlockTransfer(tokens, None, dst, 0, len(tokens))) == len(tokens)
    assert torch.equal(pool[dst], pool[: len(dst)])


def test_a_layer_wise_load_takes_no_start() -> None:
    with pytest.raises(ValueError, match="a layer-wise load waits for no start"):
        CopyBatcher(torch.zeros(4, 8), None, store=False, layers=LayerReady(4), start=EventStart(None))


def test_a_load_given_a_start_pins_every_chunk_and_writes_no_block_before_it() -> None:
    """As the server loads into an exported pool after the worker's stream work (its forward event)."""
    engine, space, pool = make()
    assert engine.store(space, 0, pool, whole(SOURCE)) == len(TOKENS)
    dst = list(range(16, 32))
    pool[dst] = -1.0
    start = _Start(engine, space)
    loaded: list[int] = []
    loader = threading.Thread(
        target=lambda: loaded.append(engine.retrieve(space, 0, pool, whole(dst), copy_start=start))
    )
    loader.start()
    try:
        deadline = time.monotonic() + 10
        while not start.seen and time.monotonic() < deadline:
            time.sleep(0.001)  # until the load waits for its start
        assert start.seen, "the load never waited for its start"
        assert engine.clear() == 0  # every chunk is pinned by then: none may be dropped
        assert bool((pool[dst] == -1.0).all()), "a block was written before the start"
    finally:
        start.opened.set()
    loader.join(timeout=10)
    assert loaded == [len(TOKENS)]
    assert torch.equal(pool[dst], pool[SOURCE])
    assert engine.clear() == 4  # the load's pins went once it was done


@pytest.mark.gpu
def test_on_the_device_a_store_copies_what_the_stream_held_at_the_release() -> None:
    """The rows change after the fence's forward event (as sampling would run after it); released
    after that change, the store saves the changed rows, though it was handed over before."""
    engine, space, pool = make("cuda")
    current = torch.cuda.Stream(pool.device)
    work = torch.full((4096, 4096), 1 / 4096, device=pool.device)
    product = torch.empty_like(work)
    with torch.cuda.stream(current):
        fence = SaveFence(current, pool.device)
        for _ in range(25):  # long enough that a store not held back would read the old rows
            torch.mm(work, work, out=product)
        pool[:16].fill_(7.0)
    transfer = whole(SOURCE)
    saver = threading.Thread(
        target=lambda: engine.store(space, 0, pool, transfer, torch.cuda.Stream(pool.device), fence)
    )
    saver.start()
    with torch.cuda.stream(current):
        fence.release_after_current()
    saver.join(timeout=30)
    torch.cuda.synchronize()
    dst = list(range(16, 32))
    assert engine.retrieve(space, 0, pool, whole(dst)) == len(TOKENS)
    torch.cuda.synchronize()
    assert bool((pool[16:32] == 7.0).all())
