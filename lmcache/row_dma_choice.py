"""Whether a pool's scattered rows move by one DMA each or by the gather and scatter kernels.

Rows of :data:`ROW_DMA_MIN_BYTES` and more always move by DMA (in one ``cudaMemcpyBatchAsync`` call:
no kernel on the SMs, no device staging); rows under :data:`TRIAL_MIN_BYTES` always by the kernels,
which the copy engine's per-copy cost would outrun. Between the two the cards disagree (458 KB rows
move faster by DMA on an H100, by the kernels on an H200: benchmarks/RESULTS.md, D51 and D102), so a
pool's registration measures both on its own card (:mod:`lmcache.row_dma_trial`) and every later
transfer of rows that long on that device takes the winner. Until a trial has settled it, the kernels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

ROW_DMA_MIN_BYTES = 768 << 10
TRIAL_MIN_BYTES = 256 << 10

DMA_PREFERENCE = 0.02
"""Row DMA wins a trial unless the kernels were faster by more than this fraction: at a tie the
copy engine alone leaves the SMs to the forward pass (a decode step slowed by a save's kernels:
benchmarks/RESULTS.md, D42)."""


@dataclass(frozen=True)
class RowDmaTrial:
    """One pool's trial: the device time of the same scattered batch, stored and loaded, both ways."""

    row_bytes: int
    rows: int
    dma_ms: float
    kernel_ms: float

    @property
    def row_dma(self) -> bool:
        """Whether rows this long should move by DMA on the trial's device."""
        return self.dma_ms <= self.kernel_ms * (1 + DMA_PREFERENCE)


_settled: dict[tuple[int, int], bool] = {}
_lock = threading.Lock()


def uses_row_dma(device_index: int, row_bytes: int) -> bool:
    """Whether scattered rows of ``row_bytes`` on CUDA device ``device_index`` move by one DMA each."""
    if row_bytes >= ROW_DMA_MIN_BYTES:
        return True
    if row_bytes < TRIAL_MIN_BYTES:
        return False
    return _settled.get((device_index, row_bytes), False)


def needs_trial(device_index: int, row_bytes: int) -> bool:
    """Whether rows this long on this device are in the range a trial decides and none has yet."""
    return TRIAL_MIN_BYTES <= row_bytes < ROW_DMA_MIN_BYTES and (device_index, row_bytes) not in _settled


def settle(device_index: int, row_bytes: int, row_dma: bool) -> None:
    """Fix the choice for rows of ``row_bytes`` on ``device_index`` (a trial's outcome, or a benchmark
    pinning one path); in force for every transfer built after."""
    with _lock:
        _settled[(device_index, row_bytes)] = row_dma


def forget(device_index: int, row_bytes: int) -> None:
    """Drop a settled choice: the next registration of such rows runs a trial again."""
    with _lock:
        _settled.pop((device_index, row_bytes), None)
