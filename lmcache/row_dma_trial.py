"""The trial that settles :mod:`lmcache.row_dma_choice` for a pool's row length on its own card.

At a pool's registration, one batch of scattered rows as a store and a load move it (a scratch tensor
of the pool's row shape on its device, page-locked host memory of our own: the pool itself is never
read or written), by row DMA and by the kernels in turn, timed by CUDA events on the pool's stream;
the faster path is settled for every later transfer of rows that long on that device.
"""

from __future__ import annotations

import math
import statistics
import threading
from typing import Any

import torch

from lmcache import c_ops, dma_batch, row_dma_choice
from lmcache.logging import init_logger
from lmcache.page_locking import pin_in_place
from lmcache.row_dma_choice import RowDmaTrial

logger = init_logger(__name__)

TRIAL_ROUNDS = 3
"""Timed rounds per path, after one untimed: each round stores then loads the batch, paths alternating."""
TRIAL_MAX_BYTES = 64 << 20
"""Most bytes of the trial's batch (its scratch rows and its host memory each)."""

_running = threading.Lock()


def settle_by_trial(pool: torch.Tensor, stream: Any, chunk_rows: int, chunks: int) -> RowDmaTrial | None:
    """Settle how ``pool``'s scattered rows move, by a trial of a batch of ``chunks`` chunks of
    ``chunk_rows`` rows on ``stream`` (the current stream when None), where its rows are in the range a
    trial decides and no trial on its device has yet; waits for it. The trial, also logged; None where
    none ran (CPU, rows outside the range, already settled, no batched DMA on the stream, host memory
    the driver would not page-lock, a trial that failed: a warning, and the kernels settled)."""
    if not pool.is_cuda:
        return None
    device = pool.device.index
    row_bytes = math.prod(pool.shape[1:]) * pool.element_size()
    stream = stream if stream is not None else torch.cuda.current_stream(pool.device)
    with _running:
        if not row_dma_choice.needs_trial(device, row_bytes) or not dma_batch.batches_on(stream):
            return None
        try:
            trial = run_trial(pool, stream, chunk_rows, chunks)
        except RuntimeError as e:  # out of device memory, say: the kernels, settled (not tried again)
            row_dma_choice.settle(device, row_bytes, False)
            logger.warning(
                "lmcache: no row DMA trial for %d-byte pool rows (%s); the kernels move them", row_bytes, e
            )
            return None
        if trial is None:
            return None
        row_dma_choice.settle(device, row_bytes, trial.row_dma)
    logger.info(
        "pool rows of %d KiB on cuda:%d move by %s (trial of %d scattered rows stored and loaded: "
        "row DMA %.3f ms, kernels %.3f ms)",
        row_bytes >> 10,
        device,
        "one DMA each" if trial.row_dma else "the gather and scatter kernels",
        trial.rows,
        trial.dma_ms,
        trial.kernel_ms,
    )
    return trial


def run_trial(pool: torch.Tensor, stream: Any, chunk_rows: int, chunks: int) -> RowDmaTrial | None:
    """Time one batch stored and loaded by each path (median of :data:`TRIAL_ROUNDS`); None where the
    driver would not page-lock the trial's host memory. Settles nothing."""
    shape = tuple(pool.shape[1:])
    row_bytes = math.prod(shape) * pool.element_size()
    rows = max(2, min(max(1, chunk_rows) * max(1, chunks), TRIAL_MAX_BYTES // row_bytes))
    host_bytes = torch.empty(rows * row_bytes, dtype=torch.uint8)
    if not pin_in_place(host_bytes):
        return None
    host = host_bytes.view(pool.dtype).view(rows, *shape)
    with torch.cuda.stream(stream):
        scratch = torch.empty((rows, *shape), dtype=pool.dtype, device=pool.device)
    # Descending ids: no two rows adjacent, so every row takes the scattered path.
    ids = list(range(rows - 1, -1, -1))
    step = max(1, chunk_rows)
    batch = [(ids[at : at + step], host[at : at + step]) for at in range(0, rows, step)]
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(TRIAL_ROUNDS + 1):
        for row_dma in (True, False):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            gather = c_ops.Transfer(scratch, stream, row_dma=row_dma)
            gather.gather(batch)
            gather.finish()
            scatter = c_ops.Transfer(scratch, stream, row_dma=row_dma)
            scatter.scatter(batch)
            scatter.finish()
            end.record(stream)
            end.synchronize()
            if round_:
                times[row_dma].append(start.elapsed_time(end))
    return RowDmaTrial(row_bytes, rows, statistics.median(times[True]), statistics.median(times[False]))
