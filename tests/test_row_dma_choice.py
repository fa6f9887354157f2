"""How a pool's scattered rows move: the choice by row length, and a trial's outcome (CPU side; the
trial itself runs on CUDA: tests/test_cuda.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmcache import c_ops, row_dma_choice
from lmcache.row_dma_choice import ROW_DMA_MIN_BYTES, TRIAL_MIN_BYTES, RowDmaTrial
from lmcache.row_dma_trial import settle_by_trial

MIDDLE = 448 << 10  # in the range a trial decides


@pytest.fixture(autouse=True)
def unsettled() -> Iterator[None]:
    for device in (0, 1):
        row_dma_choice.forget(device, MIDDLE)
    yield
    for device in (0, 1):
        row_dma_choice.forget(device, MIDDLE)


def test_long_rows_always_move_by_dma_and_short_ones_by_kernels() -> None:
    row_dma_choice.settle(0, ROW_DMA_MIN_BYTES, False)
    row_dma_choice.settle(0, TRIAL_MIN_BYTES - 1, True)
    try:
        assert row_dma_choice.uses_row_dma(0, ROW_DMA_MIN_BYTES) is True
        assert row_dma_choice.uses_row_dma(0, TRIAL_MIN_BYTES - 1) is False
        assert not row_dma_choice.needs_trial(0, ROW_DMA_MIN_BYTES)
        assert not row_dma_choice.needs_trial(0, TRIAL_MIN_BYTES - 1)
    finally:
        row_dma_choice.forget(0, ROW_DMA_MIN_BYTES)
        row_dma_choice.forget(0, TRIAL_MIN_BYTES - 1)


def test_rows_in_the_trial_range_take_the_kernels_until_a_trial_settles_them_per_device() -> None:
    assert row_dma_choice.needs_trial(0, MIDDLE) and row_dma_choice.needs_trial(0, TRIAL_MIN_BYTES)
    assert row_dma_choice.uses_row_dma(0, MIDDLE) is False
    row_dma_choice.settle(0, MIDDLE, True)
    assert row_dma_choice.uses_row_dma(0, MIDDLE) is True and not row_dma_choice.needs_trial(0, MIDDLE)
    assert row_dma_choice.uses_row_dma(1, MIDDLE) is False and row_dma_choice.needs_trial(1, MIDDLE)
    row_dma_choice.settle(0, MIDDLE, False)
    assert row_dma_choice.uses_row_dma(0, MIDDLE) is False and not row_dma_choice.needs_trial(0, MIDDLE)
    row_dma_choice.forget(0, MIDDLE)
    assert row_dma_choice.needs_trial(0, MIDDLE)


@pytest.mark.parametrize(
    ("dma_ms", "kernel_ms", "row_dma"),
    [(1.0, 1.2, True), (1.0, 1.0, True), (1.019, 1.0, True), (1.03, 1.0, False), (2.0, 1.0, False)],
)
def test_a_trial_prefers_row_dma_unless_the_kernels_are_clearly_faster(
    dma_ms: float, kernel_ms: float, row_dma: bool
) -> None:
    assert RowDmaTrial(MIDDLE, 64, dma_ms, kernel_ms).row_dma is row_dma


def test_no_trial_and_no_row_dma_on_cpu() -> None:
    """A CPU pool copies rows itself: no trial runs, nothing is settled, and a transfer asked for row
    DMA copies without it."""
    pool = torch.zeros(8, MIDDLE // 2, dtype=torch.bfloat16)
    assert settle_by_trial(pool, None, 4, 8) is None
    assert row_dma_choice.needs_trial(0, MIDDLE)
    transfer = c_ops.Transfer(pool, row_dma=True)
    assert transfer.row_dma is False
    host = torch.empty((2, *pool.shape[1:]), dtype=pool.dtype)
    pool[3], pool[1] = 3.0, 1.0
    transfer.gather([([3, 1], host)])
    assert torch.equal(host, pool[[3, 1]])
