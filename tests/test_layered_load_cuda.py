"""Layer-wise loads on CUDA: each layer's event covers that layer's rows, the strided copies land
bit-equal, and a row copied twice lands from the later copy."""

from __future__ import annotations

import pytest
import torch

from lmcache import layered_load
from lmcache.chunk_copy import CopyBatcher
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layered_load import LayerReady, scatter_layers
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.gpu

LAYERS, TPB = 6, 32


def _pool(blocks: int = 96) -> torch.Tensor:
    return torch.randn(blocks, LAYERS, 2, 2 * TPB * 16, device="cuda").to(torch.bfloat16)


def _host(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, LAYERS, 2, 2 * TPB * 16), generator=g).to(torch.bfloat16).pin_memory()


def _held_back() -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """A load stream whose copies wait behind a long kernel (reads enqueued after them run first
    unless they wait), and a stream to read on."""
    load, reader = torch.cuda.Stream(), torch.cuda.Stream()
    load.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(load):
        torch.cuda._sleep(200_000_000)
    return load, reader


def _read_by_layer(pool: torch.Tensor, ids: list[int], ready: LayerReady, reader: torch.cuda.Stream) -> list:
    """Each layer of the rows ``ids``, read on ``reader`` once ``ready`` says the layer landed."""
    got = []
    for layer in range(LAYERS):
        ready.wait(layer, reader)
        with torch.cuda.stream(reader):
            got.append(pool[ids, layer].clone())
    reader.synchronize()
    return [layer.cpu() for layer in got]


@pytest.mark.parametrize("min_bytes", [1, 1 << 30])  # one group per layer; one group for all
def test_each_layers_event_covers_its_rows_while_the_load_is_held_back(monkeypatch, min_bytes: int) -> None:
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", min_bytes)
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    monkeypatch.setattr(layered_load, "WIDEST_GROUP", 1)
    pool = _pool()
    slab = _host(12, 1)  # chunks back to back in one buffer (joined), and one on its own
    chunks = [([10, 11, 12, 13], slab[0:4]), ([40, 7, 33, 2], slab[4:8]), ([50, 51], slab[8:10])]
    chunks.append(([90, 60], _host(2, 2)))
    load, reader = _held_back()
    ready = LayerReady(LAYERS)
    scatter_layers(pool, load, chunks, ready)
    ids = [b for block_ids, _ in chunks for b in block_ids]
    want = torch.cat([src for _, src in chunks])
    got = _read_by_layer(pool, ids, ready, reader)
    for layer in range(LAYERS):
        assert torch.equal(got[layer], want[:, layer]), f"layer {layer} read before it landed"
    distinct = len({id(event) for event in ready.events})
    assert distinct == (LAYERS if min_bytes == 1 else 1)
    load.synchronize()
    assert ready.done.query()


def test_a_row_copied_twice_lands_from_the_later_copy_on_cuda() -> None:
    """The first copy's rows are scattered (staging, then a kernel on the helper stream), the second's
    adjacent (a copy straight into the pool, earlier on the stream): the second must still win."""
    pool = _pool()
    early, late = ([3, 2], _host(2, 3)), ([3], _host(1, 4))
    ready = LayerReady(LAYERS)
    scatter_layers(pool, torch.cuda.current_stream(), [early, late], ready)
    torch.cuda.synchronize()
    assert torch.equal(pool[2].cpu(), early[1][1])
    assert torch.equal(pool[3].cpu(), late[1][0])


def test_an_engine_load_layer_wise_is_bit_equal_to_a_whole_load(monkeypatch) -> None:
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", 1)
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    source = _pool(64)
    config = LMCacheEngineConfig.from_defaults(chunk_size=256, max_local_cpu_size=0.5)
    space = KeySpace("m", PoolLayout.of_pool(source, TPB))
    tokens = list(range(2048))
    stored = list(range(64))
    with CacheEngine(config) as engine:
        engine.store(space, 0, source, BlockTransfer(tokens, None, stored, 0, 2048))
        torch.cuda.synchronize()
        targets = [63 - b for b in range(64)]
        targets[8:16] = sorted(targets[8:16])  # one chunk adjacent in the pool
        whole, layered = torch.zeros_like(source), torch.zeros_like(source)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        assert engine.retrieve(space, 0, whole, BlockTransfer(tokens, None, targets, 0, 2048), stream) == 2048
        ready = LayerReady(LAYERS)
        transfer = BlockTransfer(tokens, None, targets, 0, 2048)
        assert engine.retrieve(space, 0, layered, transfer, stream, layers=ready) == 2048
        assert ready.went_layerwise
        stream.synchronize()
    assert torch.equal(layered, whole)
    assert torch.equal(layered[targets], source[stored])


def test_a_second_batch_lands_after_the_first_even_when_the_first_is_held_back(monkeypatch) -> None:
    """A load's early chunks (from the lookup's slots), then a chunk the reply names again: the rows
    end as the second batch wrote them, and its layer events stand for both batches."""
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", 1)
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    pool = _pool()
    load, reader = _held_back()
    ready = LayerReady(LAYERS)
    first, second = ([5, 9, 6], _host(3, 5)), ([9], _host(1, 6))
    scatter_layers(pool, load, [first], ready)
    scatter_layers(pool, load, [second], ready)
    got = _read_by_layer(pool, [5, 9, 6], ready, reader)
    want = first[1].clone()
    want[1] = second[1][0]
    for layer in range(LAYERS):
        assert torch.equal(got[layer], want[:, layer])


@pytest.mark.parametrize("chunks_whole", [2, 3])  # two of three whole, the last by layer; all three whole
def test_chunks_copied_whole_first_are_covered_by_every_layers_event(monkeypatch, chunks_whole: int) -> None:
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", 1)
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    pool = _pool()
    chunks = [([10, 11], _host(2, 7)), ([40, 7, 33], _host(3, 8)), ([50, 51], _host(2, 9))]
    load, reader = _held_back()
    ready = LayerReady(LAYERS)
    batch: CopyBatcher[None] = CopyBatcher(pool, load, store=False, layers=ready, whole_first=chunks_whole)
    for ids, src in chunks:
        batch.add(ids, src, None)
    batch.finish()
    assert ready.went_layerwise
    ids = [b for block_ids, _ in chunks for b in block_ids]
    want = torch.cat([src for _, src in chunks])
    got = _read_by_layer(pool, ids, ready, reader)
    for layer in range(LAYERS):
        assert torch.equal(got[layer], want[:, layer]), f"layer {layer} read before it landed"
