"""Block transfers between TensorRT-LLM's paged KV pool and contiguous chunk buffers.

A pool row (``pool[block]``: every layer, K then V) is contiguous, so a chunk is a handful of
rows, copied run by run of adjacent block ids on the CPU. On CUDA each chunk moves as one large
DMA copy: rows adjacent in the pool go straight to or from host memory; scattered rows are first
gathered on the device (one ``index_select`` per batch, or one ``index_copy_`` on the way back),
at device-memory speed. Everything is enqueued on the caller's stream with no host sync; staging
buffers come from PyTorch's caching allocator on that stream, so they stay valid until the copies
that use them have run.

Pure PyTorch: ``import lmcache.c_ops`` works on any machine, with or without CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

# Upper bound of the device staging buffer per call, so a huge batch cannot exhaust GPU memory.
MAX_STAGING_BYTES = 256 << 20

ChunkCopy = tuple[Sequence[int], torch.Tensor]
"""Block ids of one chunk and its host buffer, shaped ``[len(block_ids), *pool.shape[1:]]``."""


def is_contiguous_run(block_ids: Sequence[int]) -> bool:
    first = block_ids[0]
    return all(b == first + i for i, b in enumerate(block_ids))


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of adjacent block ids as ``(offset in block_ids, first block, length)``."""
    runs: list[tuple[int, int, int]] = []
    for i, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            offset, first, length = runs[-1]
            runs[-1] = (offset, first, length + 1)
        else:
            runs.append((i, block, 1))
    return runs


def check_block_ids(pool: torch.Tensor, block_ids: Sequence[int]) -> None:
    if not block_ids:
        raise ValueError("a chunk copy needs at least one block id")
    lo, hi = min(block_ids), max(block_ids)
    if lo < 0 or hi >= pool.shape[0]:
        raise IndexError(f"block ids must be in [0, {pool.shape[0]}); got min {lo}, max {hi}")


def _stream_context(pool: torch.Tensor, stream: Any) -> Any:
    if pool.is_cuda and stream is not None:
        return torch.cuda.stream(stream)
    return nullcontext()


def _index_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(ids, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _batches(pool: torch.Tensor, chunks: Sequence[ChunkCopy]) -> list[list[ChunkCopy]]:
    """Split chunks so each batch's device staging stays under MAX_STAGING_BYTES."""
    row_bytes = pool[0].numel() * pool.element_size()
    batches: list[list[ChunkCopy]] = [[]]
    size = 0
    for chunk in chunks:
        nbytes = len(chunk[0]) * row_bytes
        if batches[-1] and size + nbytes > MAX_STAGING_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(chunk)
        size += nbytes
    return batches


def gather_to_host(pool: torch.Tensor, chunks: Sequence[ChunkCopy], stream: Any = None) -> None:
    """Copy the rows ``pool[block_ids]`` of each chunk into its buffer."""
    for block_ids, _ in chunks:
        check_block_ids(pool, block_ids)
    with _stream_context(pool, stream):
        if not pool.is_cuda:
            for block_ids, out in chunks:
                for offset, first, length in block_runs(block_ids):
                    out[offset : offset + length].copy_(pool[first : first + length])
            return
        for batch in _batches(pool, chunks):
            _gather_cuda(pool, batch)


def _gather_cuda(pool: torch.Tensor, chunks: Sequence[ChunkCopy]) -> None:
    scattered = []
    for block_ids, out in chunks:
        if is_contiguous_run(block_ids):
            out.copy_(pool[block_ids[0] : block_ids[0] + len(block_ids)], non_blocking=True)
        else:
            scattered.append((block_ids, out))
    if not scattered:
        return
    ids = [b for block_ids, _ in scattered for b in block_ids]
    staging = torch.index_select(pool, 0, _index_tensor(ids, pool.device))
    offset = 0
    for block_ids, out in scattered:
        out.copy_(staging[offset : offset + len(block_ids)], non_blocking=True)
        offset += len(block_ids)


def scatter_from_host(pool: torch.Tensor, chunks: Sequence[ChunkCopy], stream: Any = None) -> None:
    """Copy each chunk's buffer into the rows ``pool[block_ids]``."""
    for block_ids, _ in chunks:
        check_block_ids(pool, block_ids)
    with _stream_context(pool, stream):
        if not pool.is_cuda:
            for block_ids, src in chunks:
                for offset, first, length in block_runs(block_ids):
                    pool[first : first + length].copy_(src[offset : offset + length])
            return
        for batch in _batches(pool, chunks):
            _scatter_cuda(pool, batch)


def _scatter_cuda(pool: torch.Tensor, chunks: Sequence[ChunkCopy]) -> None:
    scattered = []
    for block_ids, src in chunks:
        if is_contiguous_run(block_ids):
            pool[block_ids[0] : block_ids[0] + len(block_ids)].copy_(src, non_blocking=True)
        else:
            scattered.append((block_ids, src))
    if not scattered:
        return
    ids = [b for block_ids, _ in scattered for b in block_ids]
    staging = torch.empty((len(ids), *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    offset = 0
    for block_ids, src in scattered:
        staging[offset : offset + len(block_ids)].copy_(src, non_blocking=True)
        offset += len(block_ids)
    pool.index_copy_(0, _index_tensor(ids, pool.device), staging)
