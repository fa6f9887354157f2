"""Layer-wise loads: a load's rows land layer group by layer group, each group with its own event, so
the forward's layer ``i`` waits only for layer ``i``'s KV (TRT-LLM's ``wait_for_layer_load`` hook)
while the copy engine moves the later layers.

A cached chunk keeps whole pool rows (every layer of a block), so one layer of a run of rows is a
2-D copy: ``rows`` lines of the layer group's bytes, a row apart in the host buffer (a group's
copies enqueued by one :func:`lmcache.dma_batch.enqueue_2d`). Rows adjacent in the pool go straight
there; scattered rows go through device staging and one ``index_copy_`` per group, as whole loads
do (:mod:`lmcache.c_ops`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lmcache import c_ops, dma_batch

MIN_GROUP_BYTES = 64 << 10
"""Fewest bytes of a row one layer group's copy moves: narrower lines cost the copy engine bandwidth."""

MIN_COPY_BYTES = 2 << 20
"""Fewest bytes one 2-D copy should move on average: every copy costs the copy engine a set-up and the
host a call, and a load makes one per layer group and run of rows that follow each other in host
memory (benchmarks/RESULTS.md, D45)."""


WHOLE_FIRST_CHUNKS = 7
"""Chunks a layer-wise load copies whole before the rest go layer by layer, at most an eighth of its
chunks: the copy engine moves them while the host prepares the rest, which the first layer group
needs in full before its first copy (benchmarks/RESULTS.md, D46)."""

WIDEST_GROUP = 4
"""How many times the narrowest width a middle layer group may span. Wider lines move faster through
the copy engine; the first group stays narrow (the forward's first layer waits for it) and so do the
last (a forward that waits for the load runs its last layers after it), the groups before them
doubling up to this (benchmarks/RESULTS.md, D46)."""


def layer_groups(num_layers: int, layer_bytes: int, rows_per_copy: float = math.inf) -> list[tuple[int, int]]:
    """Consecutive layer ranges ``[a, b)`` covering ``num_layers``. The first and the last span the
    narrowest width, at least ``MIN_GROUP_BYTES`` of a row (``layer_bytes`` per layer) and enough that
    a copy of ``rows_per_copy`` rows moves ``MIN_COPY_BYTES``, unless that is the whole row; going
    back from the last, each group is twice the one after it, up to ``WIDEST_GROUP`` times the
    narrowest (layers left over join the group after them)."""
    width = max(MIN_GROUP_BYTES, MIN_COPY_BYTES / rows_per_copy)
    narrow = min(num_layers, max(1, math.ceil(width / max(1, layer_bytes))))
    first, from_last = narrow, []
    left, size = num_layers - narrow, narrow
    while left > 0:
        take = min(size, left)
        if take >= narrow:
            from_last.append(take)
        elif from_last:
            from_last[-1] += take
        else:
            first += take
        left -= take
        size = min(2 * size, WIDEST_GROUP * narrow)
    groups, a = [], 0
    for size in [first, *reversed(from_last)]:
        groups.append((a, a + size))
        a += size
    return groups


def whole_first(chunks: int) -> int:
    """How many of a ``chunks``-chunk layer-wise load's first chunks go whole."""
    return min(WHOLE_FIRST_CHUNKS, chunks // 8)


class LayerReady:
    """Where a layer-wise load stands, per pool layer: the event after which its rows are in place.

    Filled by :func:`scatter_layers`; ``done`` is the event after every copy (None on CPU, where the
    copies are synchronous). :meth:`wait` orders a stream after one layer. A load may scatter in
    several batches: each starts after the one before has landed, so the last batch's events stand
    for all (a row copied twice lands from the later batch).
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.events: list[Any] = [None] * num_layers
        self.done: Any = None
        self.went_layerwise = False
        """Whether the load's copies went layer by layer, all or after its first chunks (the forward
        must then wait layer by layer; a load done when it returned did not go layer-wise)."""

    def land_all(self, event: Any) -> None:
        """Every layer is in place after ``event`` (a load whose copies all went whole)."""
        self.events = [event] * self.num_layers
        self.done = event

    def wait(self, layer: int, stream: Any) -> None:
        """Order ``stream`` after layer ``layer``'s rows (after every row for a layer this load does not
        know: never earlier than needed)."""
        event = self.events[layer] if 0 <= layer < self.num_layers else self.done
        if event is not None and stream is not None:
            stream.wait_event(event)

    def wait_all(self, stream: Any) -> None:
        """Order ``stream`` after every copy of the load."""
        if self.done is not None and stream is not None:
            stream.wait_event(self.done)


def scatter_layers(
    pool: torch.Tensor, stream: Any, chunks: Sequence[c_ops.ChunkCopy], ready: LayerReady
) -> None:
    """Copy each chunk's host rows into ``pool[block_ids]``, one layer group after the other, enqueued on
    ``stream`` (CUDA); ``ready`` gets each layer's event, and ``stream`` is ordered after every copy."""
    for block_ids, _ in chunks:
        c_ops.check_block_ids(pool, block_ids)
    num_layers = pool.shape[1]
    if ready.num_layers != num_layers:
        raise ValueError(f"a layer-wise load into a {num_layers}-layer pool got {ready.num_layers} layers")
    ready.went_layerwise = True
    layer_bytes = math.prod(pool.shape[2:]) * pool.element_size()
    joined = c_ops.join_adjacent(_last_writes(chunks))
    rows = sum(len(block_ids) for block_ids, _ in joined)
    groups = layer_groups(num_layers, layer_bytes, rows / max(1, len(joined)))
    if not pool.is_cuda:
        for a, b in groups:
            for block_ids, src in joined:
                for offset, first, length in c_ops.block_runs(block_ids):
                    pool[first : first + length, a:b].copy_(src[offset : offset + length, a:b])
        return
    _scatter_layers_cuda(pool, stream, joined, groups, layer_bytes, ready)


def _last_writes(chunks: Sequence[c_ops.ChunkCopy]) -> list[c_ops.ChunkCopy]:
    """The copies with every row a later copy writes again left out: a chunk queued early from the slot
    a lookup named and again from the slot the server's reply named must land from the second, and
    the layer groups below do not keep the order of copies to one row."""
    seen: set[int] = set()
    kept: list[c_ops.ChunkCopy] = []
    for block_ids, src in reversed(chunks):
        fresh = [i for i, block in enumerate(block_ids) if block not in seen]
        seen.update(block_ids)
        if len(fresh) == len(block_ids):
            kept.append((block_ids, src))
            continue
        for _, first, length in c_ops.block_runs(fresh):
            kept.append((block_ids[first : first + length], src[first : first + length]))
    kept.reverse()
    return kept


def _scatter_layers_cuda(
    pool: torch.Tensor,
    stream: Any,
    joined: list[c_ops.ChunkCopy],
    groups: list[tuple[int, int]],
    layer_bytes: int,
    ready: LayerReady,
) -> None:
    for _, src in joined:
        if not src[0].is_contiguous() or src.is_cuda:
            raise ValueError("a layer-wise load reads host buffers of whole, contiguous rows")
    direct: list[c_ops.ChunkCopy] = []
    scattered: list[c_ops.ChunkCopy] = []
    for copy in joined:
        (direct if c_ops.is_contiguous_run(copy[0]) else scattered).append(copy)
    side = c_ops.side_stream(pool.device, "scatter")
    pool_pitch = pool.stride(0) * pool.element_size()
    rows = sum(len(ids) for ids, _ in scattered)
    # Per copy, once: (pool address of its first row, rows, host address, host pitch).
    to_pool = [(pool.data_ptr() + ids[0] * pool_pitch, len(ids), *_host_lines(src)) for ids, src in direct]
    to_staging = [(len(ids), *_host_lines(src)) for ids, src in scattered]
    with torch.cuda.stream(stream):
        index = c_ops.index_tensor([b for ids, _ in scattered for b in ids], pool.device) if rows else None
        for a, b in groups:
            width, offset = (b - a) * layer_bytes, a * layer_bytes
            copies: list[dma_batch.Copy2d] = [
                (pool_at + offset, pool_pitch, host + offset, pitch, width, lines)
                for pool_at, lines, host, pitch in to_pool
            ]
            staging = None
            if scattered:
                staging = torch.empty((rows, b - a, *pool.shape[2:]), dtype=pool.dtype, device=pool.device)
                dst = staging.data_ptr()
                for lines, host, pitch in to_staging:
                    copies.append((dst, width, host + offset, pitch, width, lines))
                    dst += lines * width
            dma_batch.enqueue_2d(copies, stream)
            landed = torch.cuda.Event()
            if staging is not None:
                copied = torch.cuda.Event()
                copied.record(stream)
                side.wait_event(copied)
                with torch.cuda.stream(side):
                    pool[:, a:b].index_copy_(0, index, staging)
                staging.record_stream(side)
                landed.record(side)
            else:
                landed.record(stream)
            for layer in range(a, b):
                ready.events[layer] = landed
        if index is not None:
            index.record_stream(side)
    stream.wait_event(landed)
    ready.done = landed


def _host_lines(src: torch.Tensor) -> tuple[int, int]:
    """A host buffer of whole rows as 2-D copy lines: (address, pitch from one row to the next)."""
    return src.data_ptr(), src.stride(0) * src.element_size()
