"""Layer-wise loads on the host path: the same rows as a whole load, layer group by layer group."""

from __future__ import annotations

import pytest
import torch

from lmcache import c_ops, chunk_copy, layered_load
from lmcache.chunk_copy import CopyBatcher
from lmcache.layered_load import LayerReady, layer_groups, scatter_layers


def _pool(blocks: int = 12, layers: int = 5) -> torch.Tensor:
    return torch.zeros(blocks, layers, 2, 8, dtype=torch.float32)


def _chunk(block_ids: list[int], layers: int, seed: int) -> c_ops.ChunkCopy:
    g = torch.Generator().manual_seed(seed)
    return block_ids, torch.randn(len(block_ids), layers, 2, 8, generator=g)


def test_layer_groups_cover_every_layer_once_and_reach_the_minimum_width() -> None:
    shapes = [(28, 32 << 10), (32, 128 << 10), (80, 16 << 10), (3, 1), (1, 1 << 20), (5, 40000)]
    for layers, layer_bytes in shapes:
        groups = layer_groups(layers, layer_bytes)
        assert [layer for a, b in groups for layer in range(a, b)] == list(range(layers))
        widths = [(b - a) * layer_bytes for a, b in groups]
        assert all(w >= layered_load.MIN_GROUP_BYTES for w in widths) or groups == [(0, layers)]
        narrowest = min(widths)
        assert max(widths) < (layered_load.WIDEST_GROUP + 1) * narrowest
    # Narrow at both ends, wider lines in between.
    assert layer_groups(28, 32 << 10) == [(0, 2), (2, 6), (6, 14), (14, 22), (22, 26), (26, 28)]
    assert [b - a for a, b in layer_groups(32, 128 << 10)] == [1, 4, 4, 4, 4, 4, 4, 4, 2, 1]
    # Copies of 8 rows (one chunk each, not joined): each must still move MIN_COPY_BYTES.
    assert layer_groups(28, 32 << 10, rows_per_copy=8) == [(0, 8), (8, 20), (20, 28)]
    assert layer_groups(28, 32 << 10, rows_per_copy=512)[0] == (0, 2)


@pytest.mark.parametrize("min_bytes", [1, 200, 1 << 20])  # one layer, two layers, all five per group
def test_a_layered_load_writes_what_a_whole_load_writes(monkeypatch, min_bytes: int) -> None:
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", min_bytes)
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    chunks = [_chunk([3, 4, 5], 5, 1), _chunk([9, 0], 5, 2), _chunk([7], 5, 3), _chunk([10, 11], 5, 4)]
    whole, layered = _pool(), _pool()
    c_ops.scatter_from_host(whole, chunks)
    ready = LayerReady(5)
    scatter_layers(layered, None, chunks, ready)
    assert torch.equal(layered, whole)
    assert ready.went_layerwise and ready.done is None  # host copies: done when the call returns
    untouched = [b for b in range(12) if b not in {3, 4, 5, 9, 0, 7, 10, 11}]
    assert not layered[untouched].any()


def test_a_row_copied_twice_lands_from_the_later_copy() -> None:
    """A chunk queued from a lookup's slot and again from the reply's slot: the second copy wins (on
    CUDA the first, scattered, goes through staging after the second's direct copy: test_cuda.py)."""
    early, late = _chunk([3, 2], 4, 1), _chunk([3], 4, 2)
    other = _chunk([8], 4, 3)
    pool = _pool(layers=4)
    scatter_layers(pool, None, [early, other, late], LayerReady(4))
    assert torch.equal(pool[2], early[1][1])
    assert torch.equal(pool[3], late[1][0])
    assert torch.equal(pool[8], other[1][0])


def test_bad_block_ids_and_layer_counts_change_nothing() -> None:
    pool = _pool()
    with pytest.raises(IndexError, match=r"block ids must be in \[0, 12\)"):
        scatter_layers(pool, None, [_chunk([1, 2], 5, 1), _chunk([12], 5, 2)], LayerReady(5))
    with pytest.raises(ValueError, match="5-layer pool got 4 layers"):
        scatter_layers(pool, None, [_chunk([1], 5, 1)], LayerReady(4))
    assert not pool.any()


def test_a_layered_batcher_enqueues_everything_at_finish_and_stores_are_never_layered() -> None:
    pool = _pool()
    chunks = [_chunk([1, 2], 5, 1), _chunk([6], 5, 2)]
    flushed: list[list[int]] = []
    ready = LayerReady(5)
    batch: CopyBatcher[int] = CopyBatcher(
        pool, store=False, on_flush=lambda items, _: flushed.append(items), layers=ready
    )
    for i, (ids, src) in enumerate(chunks):
        batch.add(ids, src, i)
    assert not pool.any() and not flushed  # nothing before finish: layer 0 of every chunk goes first
    batch.finish()
    assert flushed == [[0, 1]] and ready.went_layerwise
    assert torch.equal(pool[[1, 2, 6]], torch.cat([chunks[0][1], chunks[1][1]]))
    with pytest.raises(ValueError, match="only loads are layer-wise"):
        CopyBatcher(pool, store=True, layers=LayerReady(5))


def test_waits_on_a_host_load_are_no_ops_and_unknown_layers_wait_for_everything() -> None:
    class Stream:
        def __init__(self) -> None:
            self.waited: list[object] = []

        def wait_event(self, event: object) -> None:
            self.waited.append(event)

    ready, stream = LayerReady(3), Stream()
    ready.wait(0, stream)
    ready.wait_all(stream)
    assert stream.waited == []
    ready.events, ready.done = ["e0", "e1", "e2"], "all"
    ready.wait(1, stream)
    ready.wait(7, stream)  # a layer the pool does not have: never earlier than the whole load
    ready.wait_all(stream)
    assert stream.waited == ["e1", "all", "all"]


def test_a_layered_batch_flushed_twice_lands_the_second_over_the_first() -> None:
    """Chunks copied early from a lookup's slots, then one named again by the server's reply."""
    pool = _pool()
    ready = LayerReady(5)
    batch: CopyBatcher[None] = CopyBatcher(pool, store=False, layers=ready)
    early, again = _chunk([1, 2], 5, 1), _chunk([2], 5, 2)
    batch.add(*early, None)
    batch.flush()
    assert torch.equal(pool[[1, 2]], early[1])  # enqueued at the flush, before the reply
    batch.add(*again, None)
    batch.finish()
    assert torch.equal(pool[1], early[1][0]) and torch.equal(pool[2], again[1][0])


def test_a_layered_loads_first_chunks_go_whole_as_they_come_and_the_rest_by_layer(monkeypatch) -> None:
    pool = _pool(blocks=24)
    chunks = [_chunk([2 * i, 2 * i + 1], 5, i) for i in range(8)]
    layered_batches: list[int] = []
    scatter = chunk_copy.scatter_layers

    def spy(pool, stream, copies, ready):  # type: ignore[no-untyped-def]
        layered_batches.append(len(copies))
        scatter(pool, stream, copies, ready)

    monkeypatch.setattr(chunk_copy, "scatter_layers", spy)
    flushed: list[list[int]] = []
    ready = LayerReady(5)
    batch: CopyBatcher[int] = CopyBatcher(
        pool, store=False, on_flush=lambda items, _: flushed.append(items), layers=ready, whole_first=3
    )
    for i, (ids, src) in enumerate(chunks):
        batch.add(ids, src, i)
        if i == 2:  # whole, in the usual ramp (one chunk, then two), before any layer goes
            assert flushed == [[0], [1, 2]] and torch.equal(pool[:6], torch.cat([c[1] for c in chunks[:3]]))
            assert ready.went_layerwise and not layered_batches
    batch.finish()
    assert flushed[2:] == [[3, 4, 5, 6, 7]] and layered_batches == [5]
    assert torch.equal(pool[:16], torch.cat([src for _, src in chunks]))


def test_a_layered_load_all_whole_still_tells_every_layer() -> None:
    pool = _pool()
    ready = LayerReady(5)
    batch: CopyBatcher[None] = CopyBatcher(pool, store=False, layers=ready, whole_first=4)
    chunk = _chunk([3, 4], 5, 1)
    batch.add(*chunk, None)
    batch.finish()
    assert ready.went_layerwise and torch.equal(pool[[3, 4]], chunk[1])
    assert [layered_load.whole_first(n) for n in (1, 7, 8, 16, 64, 1000)] == [0, 0, 1, 2, 7, 7]
