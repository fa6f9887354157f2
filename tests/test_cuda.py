"""CUDA paths of c_ops and the engine: pinned memory, caller streams, no host sync, event ordering.

These run on the GPU machine (see benchmarks/RESULTS.md); without CUDA there is nothing to run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcache import c_ops, dma_batch, row_dma_choice, row_dma_trial
from lmcache.chunk_copy import CopyBatcher
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.gpu

TPB, CHUNK = 32, 256


def cuda_pool(num_blocks: int = 96) -> torch.Tensor:
    return torch.randn(num_blocks, 4, 2, 2 * TPB * 16, device="cuda").to(torch.bfloat16)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4, 5, 6, 7], [9, 3, 17, 4, 40, 41, 42, 2]])
def test_gather_scatter_on_side_stream_without_host_sync(ids: list[int]) -> None:
    pool = cuda_pool()
    stream = torch.cuda.Stream()
    host = torch.empty((len(ids), *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        c_ops.gather_to_host(pool, [(ids, host)], stream)
        targets = [60 + i for i in range(len(ids))][::-1]
        c_ops.scatter_from_host(pool, [(targets, host)], stream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert torch.equal(pool[targets], pool[ids])


def test_a_save_does_not_wait_for_a_load_in_flight() -> None:
    """A load's scatter waits on the device for its DMA; a save's gather enqueued meanwhile (another
    request, another stream) must not queue behind it: the save completes while the load's stream
    is still held back, and both land bit-equal."""
    pool = cuda_pool()
    load_stream, save_stream = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (load_stream, save_stream):
        stream.wait_stream(torch.cuda.current_stream())
    source = torch.randn((4, *pool.shape[1:])).to(pool.dtype).pin_memory()
    with torch.cuda.stream(load_stream):
        torch.cuda._sleep(4_000_000_000)  # about 2 s of GPU clock: the load's DMA waits behind it
    held = torch.cuda.Event()
    held.record(load_stream)
    c_ops.scatter_from_host(pool, [([70, 61, 80, 66], source)], load_stream)
    saved = torch.empty((4, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    c_ops.gather_to_host(pool, [([9, 3, 17, 4], saved)], save_stream)
    save_done = torch.cuda.Event()
    save_done.record(save_stream)
    save_done.synchronize()
    assert not held.query(), "the save waited for the load's stream"
    assert torch.equal(saved, pool[[9, 3, 17, 4]].cpu())
    load_stream.synchronize()
    assert torch.equal(pool[[70, 61, 80, 66]].cpu(), source)


@pytest.mark.parametrize("layout", ["adjacent", "scattered", "mixed"])
def test_chunks_back_to_back_in_host_memory_move_as_joined_copies(layout: str) -> None:
    """Three chunks in one pinned slab, so ``join_adjacent`` joins them: every device path (one
    direct DMA, staging + index kernels, a mix) must still put each row where its id says."""
    pool = cuda_pool()
    ids = {
        "adjacent": [[10, 11], [12, 13], [14, 15]],
        "scattered": [[5, 1], [30, 2], [7, 44]],
        "mixed": [[20, 21], [3, 9], [22, 23]],
    }[layout]
    slab = torch.empty((6, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    chunks = [(block_ids, slab[2 * i : 2 * i + 2]) for i, block_ids in enumerate(ids)]
    assert len(c_ops.join_adjacent(chunks)) == 1
    targets = [[60, 61], [62, 63], [64, 65]] if layout == "adjacent" else [[70, 62], [91, 60], [64, 80]]
    _gather_then_scatter(pool, chunks, targets, slab)


def _gather_then_scatter(
    pool: torch.Tensor, chunks: list[c_ops.ChunkCopy], targets: list[list[int]], slab: torch.Tensor
) -> None:
    """Gather ``chunks`` (views of ``slab``) from ``pool``, scatter them back into ``targets``; check
    both ways bit-equal."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    c_ops.gather_to_host(pool, chunks, stream)
    c_ops.scatter_from_host(pool, [(t, buf) for t, (_, buf) in zip(targets, chunks, strict=True)], stream)
    stream.synchronize()
    flat_ids = [b for block_ids, _ in chunks for b in block_ids]
    flat_targets = [b for block_ids in targets for b in block_ids]
    assert torch.equal(slab.cuda(), pool[flat_ids])
    assert torch.equal(pool[flat_targets], pool[flat_ids])


@pytest.mark.parametrize("hint", ["request", "other"])
def test_batches_of_a_transfer_index_slices_of_the_request_block_ids(hint: str) -> None:
    """Batch after batch, scatters and gathers index one upload of the request's block ids (or
    upload their own where the ids given are not the request's): every row lands where its id says."""
    pool = cuda_pool()
    request = [5, 1, 30, 2, 7, 44, 50, 51, 3, 9]
    known = request if hint == "request" else [0, 1, 2, 3]
    slab = torch.empty((10, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    chunks = [(request[i : i + 2], slab[i : i + 2]) for i in range(0, 10, 2)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    gather = c_ops.Transfer(pool, stream, interleave=True, block_ids=known)
    for i in range(0, 5, 2):  # batches of chunks 0-1, 2-3, 4
        gather.gather(chunks[i : i + 2])
    gather.finish()
    targets = [60, 61, 70, 62, 91, 92, 64, 80, 81, 66]
    scatter = c_ops.Transfer(pool, stream, block_ids=targets if hint == "request" else known)
    for i in range(0, 10, 4):
        scatter.scatter([(targets[j : j + 2], slab[j : j + 2]) for j in range(i, min(i + 4, 10), 2)])
    scatter.finish()
    stream.synchronize()
    assert torch.equal(slab.cuda(), pool[request])
    assert torch.equal(pool[targets], pool[request])


def test_engine_round_trip_with_pinned_l1_and_event_ordering() -> None:
    pool = cuda_pool()
    engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.5))
    assert engine.l1.arena.pinned
    space = KeySpace("m", PoolLayout.of_pool(pool, TPB))
    toks = list(range(1024))
    src = [5, 6, 7, 8, 9, 10, 11, 12] + list(range(30, 54))[::-1]
    save, load = torch.cuda.Stream(), torch.cuda.Stream()
    # A kernel writes the pool on the default stream; the save must be ordered after it.
    pool[src] = torch.full_like(pool[src], 3.0)
    save.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert engine.store(space, 0, pool, BlockTransfer(toks, None, src, 0, 1024), save) == 1024
    finally:
        torch.cuda.set_sync_debug_mode("default")
    chunk = engine.l1.get(engine.chunk_spans(space, 0, toks, None)[0].key)
    assert chunk is not None and chunk.buffer.data.is_pinned() and chunk.ready is not None
    assert engine.lookup(space, toks, pin_id="r") == 1024
    dst = list(range(60, 92))
    # The load stream never synchronized with the save stream: the engine orders it by event.
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 1024), load, pin_id="r") == 1024
    load.synchronize()
    assert torch.equal(pool[dst], pool[src])
    assert bool((pool[dst] == 3.0).all())


def test_retrieve_skips_blocks_before_start_on_cuda() -> None:
    pool = cuda_pool()
    engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.5))
    space = KeySpace("m", PoolLayout.of_pool(pool, TPB))
    toks = list(range(512))
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 512))
    dst = list(range(40, 56))
    pool[dst] = 0
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 96, 512)) == 416
    torch.cuda.synchronize()
    assert int(torch.count_nonzero(pool[dst[:3]])) == 0
    assert torch.equal(pool[dst[3:]], pool[list(range(3, 16))])


@pytest.mark.parametrize("segment_bytes", [c_ops.LANE_SEGMENT_BYTES, 8 * 32 << 10, 1])
def test_store_orders_the_callers_stream_after_copies_on_both_lanes(
    segment_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores alternate their copies over two streams, batch by batch or (``segment_bytes``: one
    chunk, or one copy) within a batch; a caller that waits on its own stream (as TRT-LLM does
    before reusing a request's blocks) must see every chunk copied."""
    monkeypatch.setattr(c_ops, "LANE_SEGMENT_BYTES", segment_bytes)
    pool = cuda_pool(160)
    engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.5))
    space = KeySpace("m", PoolLayout.of_pool(pool, TPB))
    # 13 chunks (of 8 rows of 32 KiB) in batches of 1, 2, 4 and 6 chunks. Only the last batch has
    # scattered blocks, so only it needs the gather kernel's stream, which a long sleep holds back:
    # the caller's stream must still wait for that batch, on whichever lane its copies went.
    toks = list(range(13 * CHUNK))
    src = list(range(72)) + list(range(103, 71, -1))
    expected = pool[src].cpu()
    save = torch.cuda.Stream()
    save.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(c_ops.side_stream(pool.device, "gather")):
        torch.cuda._sleep(200_000_000)
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, src, 0, len(toks)), save) == len(toks)
    done = torch.cuda.Event()
    done.record(save)
    done.synchronize()
    for i, span in enumerate(engine.chunk_spans(space, 0, toks, None)):
        chunk = engine.l1.get(span.key)
        assert chunk is not None
        got = chunk.buffer.view(pool.dtype, (8, *pool.shape[1:]))
        assert torch.equal(got, expected[i * 8 : (i + 1) * 8]), f"chunk {i} not copied yet"


FIRST_LOAD = """
import json, sys, time
import torch
from lmcache.chunk_copy import CopyBatcher
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

pool = torch.randn(96, 4, 2, 2 * 32 * 16, device="cuda").to(torch.bfloat16)
stream = torch.cuda.Stream()
if sys.argv[1] == "warm":
    CopyBatcher.warm_up(pool, stream, 256 // 32)
engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=256, max_local_cpu_size=0.05))
space = KeySpace("m", PoolLayout.of_pool(pool, 32))
tokens, source, target = list(range(256)), list(range(8)), [40, 9, 33, 20, 41, 12, 30, 25]
busy = torch.randn(4096, 4096, device="cuda")
torch.mm(busy, busy)  # the library's set-up, outside the timing
stream.wait_stream(torch.cuda.current_stream())
# Adjacent source blocks: the store is one plain copy, so it loads no kernel.
assert engine.store(space, 0, pool, BlockTransfer(tokens, None, source, 0, 256), stream) == 256
stream.synchronize()
began = time.perf_counter()
torch.mm(busy, busy)
torch.cuda.synchronize()
count = int(1.5 / (time.perf_counter() - began)) + 1
with torch.cuda.stream(stream):
    out = busy
    for _ in range(count):  # seconds of earlier work on the stream the load is given
        out = torch.mm(out, busy).clamp_(-1, 1)
    earlier = torch.cuda.Event()
    earlier.record(stream)
loaded = engine.retrieve(space, 0, pool, BlockTransfer(tokens, None, target, 0, 256), stream)
waited = earlier.query()
stream.synchronize()
print(json.dumps({"loaded": loaded, "waited": waited, "equal": torch.equal(pool[target], pool[source])}))
"""


def first_load(mode: str) -> dict[str, object]:
    """A fresh process's first load into scattered blocks, after ``mode`` (``warm``: the warm-up that
    registration runs; ``cold``: none), given a stream with seconds of earlier work."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "CUDA_MODULE_LOADING": "LAZY",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", FIRST_LOAD, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_after_the_warm_up_a_first_load_waits_for_no_earlier_work() -> None:
    """Registration's warm-up loads the kernels and takes the staging and page-locked memory a load
    uses, each a device-wide barrier the first time: without it (the control) a fresh process's first
    load into scattered blocks waits on the host for the stream's earlier work."""
    cold, warm = first_load("cold"), first_load("warm")
    assert cold == {"loaded": 256, "waited": True, "equal": True}, "the control no longer shows the barrier"
    assert warm == {"loaded": 256, "waited": False, "equal": True}


@pytest.mark.parametrize("implementation", ["native", "python"])
@pytest.mark.parametrize("rows", ["packed", "apart"])
def test_batched_copies_land_where_the_ids_say(
    implementation: str, rows: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's copies enqueued by the C loop and by the Python reference (``lmcache.dma_batch``),
    into a pool whose rows are packed or lie apart (a view of every other row of a larger tensor):
    adjacent and scattered ids both land bit-equal, and a wrong-sized buffer is refused."""
    if implementation == "python":
        monkeypatch.setattr(dma_batch, "_native", None)
    else:
        assert dma_batch.native_loops() is not None, "lmcache._dmabatch is not built (setup.py build_ext)"
    pool = cuda_pool(192)[::2] if rows == "apart" else cuda_pool()
    assert (pool.stride(0) == pool[0].numel()) == (rows == "packed")
    ids = [[20, 21, 22], [3, 9, 4], [23, 24, 25]]
    slab = torch.empty((9, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    chunks = [(block_ids, slab[3 * i : 3 * i + 3]) for i, block_ids in enumerate(ids)]
    _gather_then_scatter(pool, chunks, [[60, 61, 62], [70, 65, 91], [63, 64, 80]], slab)
    stream = torch.cuda.Stream()
    with pytest.raises(ValueError, match="must be contiguous"):
        c_ops.gather_to_host(pool, [([1, 2], slab[0:3])], stream)
    with pytest.raises(ValueError, match="must be contiguous"):
        c_ops.scatter_from_host(pool, [([1, 5], slab[0:4:2])], stream)


@pytest.mark.parametrize("row_dma_min", [0, 1 << 40])
def test_a_load_copying_a_row_twice_lands_the_later_copy(
    row_dma_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within one batch of a whole load (rows moved by one DMA each, or scattered by the kernel on
    the helper stream), a row copied again, here by an adjacent copy straight into the pool, lands
    from the later copy."""
    monkeypatch.setattr(row_dma_choice, "ROW_DMA_MIN_BYTES", row_dma_min)
    pool = cuda_pool(16)
    pool.zero_()
    rows = pool.shape[1:]
    first = torch.full((2, *rows), 1.0, dtype=pool.dtype).pin_memory()
    again = torch.full((1, *rows), 2.0, dtype=pool.dtype).pin_memory()
    stream = torch.cuda.Stream()
    copier: CopyBatcher[None] = CopyBatcher(pool, stream, store=False)
    copier.add([0], torch.zeros((1, *rows), dtype=pool.dtype).pin_memory(), None)
    copier.add([9, 4], first, None)  # scattered: row DMA or staging and the kernel
    copier.add([4], again, None)  # adjacent: one copy straight into row 4
    copier.finish()
    stream.synchronize()
    assert torch.all(pool[4] == 2.0) and torch.all(pool[9] == 1.0)


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("row_dma_min", [0, 1 << 40])
def test_an_abandoned_batch_orders_its_stream_after_every_copy_it_enqueued(
    row_dma_min: int, store: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed request gives its batch up: the copies still queued are dropped, and its stream is
    ordered after every copy already enqueued, the helper stream's kernels included (held back here),
    so the slots and blocks can be given back once the stream is done."""
    monkeypatch.setattr(row_dma_choice, "ROW_DMA_MIN_BYTES", row_dma_min)
    pool = cuda_pool(64)
    rows = pool.shape[1:]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(c_ops.side_stream(pool.device, "gather" if store else "scatter")):
        torch.cuda._sleep(200_000_000)
    sent = torch.full((2, *rows), 1.0, dtype=pool.dtype).pin_memory()
    dropped = torch.full((2, *rows), 2.0, dtype=pool.dtype).pin_memory()
    expected_sent = pool[[9, 4]].cpu() if store else sent.clone()
    expected_dropped = dropped.clone() if store else pool[[20, 30]].cpu()
    batch: CopyBatcher[None] = CopyBatcher(pool, stream, store=store)
    batch.add([9, 4], sent, None)  # a batch's first flush holds one chunk: enqueued at once
    batch.add([20, 30], dropped, None)  # queued only
    batch.abandon()
    stream.synchronize()
    if store:
        assert torch.equal(sent, expected_sent) and torch.equal(dropped, expected_dropped)
    else:
        assert torch.equal(pool[[9, 4]].cpu(), expected_sent)
        assert torch.equal(pool[[20, 30]].cpu(), expected_dropped)


@pytest.mark.parametrize("row_dma_min", [0, 1 << 40])
def test_a_load_uploads_the_block_ids_only_for_its_kernels(
    row_dma_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploading a load's block ids ahead (while a server's reply travels) happens only where scatter
    kernels will index them: rows moved by one DMA each need no upload, which would only delay the
    first copy."""
    monkeypatch.setattr(row_dma_choice, "ROW_DMA_MIN_BYTES", row_dma_min)
    stream = torch.cuda.Stream()
    transfer = c_ops.Transfer(cuda_pool(16), stream, block_ids=[9, 4, 7])
    transfer.prepare_index()
    kernels = row_dma_min > 0 or not dma_batch.batches_on(stream)
    uploaded = transfer.request_index
    assert (uploaded is not None) == kernels
    stream.synchronize()
    if uploaded is not None:
        assert uploaded.tolist() == [9, 4, 7]


@pytest.mark.parametrize("pinned", [True, False])
def test_scattered_rows_move_by_row_dma_without_kernels(
    pinned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows at least ``ROW_DMA_MIN_BYTES`` long move by one DMA each in one batched call, on streams
    that allow it: a store and a load into scattered blocks land bit-equal, with no gather or scatter
    kernel (they would raise here), from page-locked L1 and from pageable L1 (where page-locking
    was refused)."""
    if not dma_batch.batches_on(torch.cuda.Stream()):
        pytest.fail("this CUDA runtime has no cudaMemcpyBatchAsync (CUDA 13): row DMA is untested")
    monkeypatch.setattr(row_dma_choice, "ROW_DMA_MIN_BYTES", 0)

    def no_kernel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a gather or scatter kernel ran")

    monkeypatch.setattr(torch, "index_select", no_kernel)
    monkeypatch.setattr(torch.Tensor, "index_copy_", no_kernel)
    pool = cuda_pool(96)
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.5)
    engine = CacheEngine(config, pinned=pinned)
    space = KeySpace("m", PoolLayout.of_pool(pool, TPB))
    toks = list(range(6 * CHUNK))
    src = [94 - 2 * i for i in range(24)] + list(range(24))  # scattered, then adjacent
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, src, 0, len(toks)), stream) == len(toks)
    target = pool.clone()
    dst = [95 - 3 * i for i in range(24)] + list(range(0, 24))
    target[dst] = 0
    assert engine.retrieve(space, 0, target, BlockTransfer(toks, None, dst, 0, len(toks)), stream) == len(
        toks
    )
    stream.synchronize()
    assert torch.equal(target[dst], pool[src])


def test_a_registration_trial_settles_how_rows_move_on_this_card() -> None:
    """Rows in the range a trial decides (Qwen2-1.5B at TP 4: 448 KiB): a trial times both paths on a
    scratch batch, the pool itself untouched, and every transfer built after takes the winner; a
    second trial does not run; a registration's warm-up runs one. Both paths move the rows bit-equal."""
    if not dma_batch.batches_on(torch.cuda.Stream()):
        pytest.fail("this CUDA runtime has no cudaMemcpyBatchAsync (CUDA 13): the trial is untested")
    pool = torch.randn(24, 28, 2, 32 * 128, device="cuda").to(torch.bfloat16)
    row_bytes = pool[0].nbytes
    row_dma_choice.forget(pool.device.index, row_bytes)
    before = pool.clone()
    stream = torch.cuda.Stream()
    try:
        trial = row_dma_trial.settle_by_trial(pool, stream, 4, 2)
        assert trial is not None and trial.rows == 8 and trial.row_bytes == row_bytes
        assert trial.dma_ms > 0 and trial.kernel_ms > 0
        assert row_dma_choice.uses_row_dma(pool.device.index, row_bytes) is trial.row_dma
        assert c_ops.Transfer(pool, stream).row_dma is trial.row_dma
        assert row_dma_trial.settle_by_trial(pool, stream, 4, 2) is None
        assert torch.equal(pool, before)
        for row_dma in (True, False):
            pool[[20, 1, 22, 7]] = 0
            stream.wait_stream(torch.cuda.current_stream())
            host = torch.empty((4, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
            gather = c_ops.Transfer(pool, stream, row_dma=row_dma)
            assert gather.row_dma is row_dma
            gather.gather([([9, 3], host[:2]), ([17, 5], host[2:])])
            gather.finish()
            scatter = c_ops.Transfer(pool, stream, row_dma=row_dma)
            scatter.scatter([([20, 1, 22, 7], host)])
            scatter.finish()
            stream.synchronize()
            assert torch.equal(pool[[20, 1, 22, 7]], pool[[9, 3, 17, 5]])
        row_dma_choice.forget(pool.device.index, row_bytes)
        CopyBatcher.warm_up(pool, stream, 4)  # what every registration calls
        assert not row_dma_choice.needs_trial(pool.device.index, row_bytes)
    finally:
        row_dma_choice.forget(pool.device.index, row_bytes)


def test_a_failed_trial_settles_the_kernels_and_registers_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial that fails (out of device memory, say) rejects no pool: a warning, the kernels settled
    for rows that long, and no trial again."""
    pool = torch.randn(24, 28, 2, 32 * 128, device="cuda").to(torch.bfloat16)
    row_bytes = pool[0].nbytes
    row_dma_choice.forget(pool.device.index, row_bytes)

    def out_of_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(row_dma_trial, "run_trial", out_of_memory)
    try:
        CopyBatcher.warm_up(pool, torch.cuda.Stream(), 4)
        assert not row_dma_choice.needs_trial(pool.device.index, row_bytes)
        assert c_ops.Transfer(pool, torch.cuda.Stream()).row_dma is False
    finally:
        row_dma_choice.forget(pool.device.index, row_bytes)
