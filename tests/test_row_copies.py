"""lmcache.dma_batch.row_copies on the CPU: the copies between chunks' host buffers and pool rows, built
in C (``lmcache._dmabatch``) and by the Python reference, are the same and move the right bytes.

The copies are applied with ``memmove`` to CPU tensors, so what a CUDA transfer would enqueue is
checked byte for byte without a GPU.
"""

from __future__ import annotations

import ctypes
import random
import re
from collections.abc import Callable, Sequence

import pytest
import torch

from lmcache import dma_batch

RowCopies = Callable[..., list[dma_batch.Copy]]


def _native(
    pool: int,
    row_stride: int,
    row_bytes: int,
    num_rows: int,
    chunks: Sequence[dma_batch.RowChunk],
    *,
    to_host: bool,
) -> list[dma_batch.Copy]:
    from lmcache import _dmabatch

    return _dmabatch.row_copies(pool, row_stride, row_bytes, num_rows, to_host, chunks)


IMPLEMENTATIONS: dict[str, RowCopies] = {"python": dma_batch.row_copies_python, "native": _native}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def row_copies(request: pytest.FixtureRequest) -> RowCopies:
    return IMPLEMENTATIONS[request.param]


def _pool(rows: int, *, strided: bool) -> torch.Tensor:
    """Rows of 48 bytes filled with distinct values; ``strided``: each row 96 bytes after the last."""
    base = torch.arange(rows * 2 * 12, dtype=torch.int32).view(rows, 2, 12)
    return base[:, 0] if strided else base[:, 0].contiguous()


def _chunks(
    pool: torch.Tensor, layout: list[list[int]]
) -> tuple[list[dma_batch.RowChunk], list[torch.Tensor]]:
    """A host buffer per chunk of ``layout`` (its block ids), and the chunks naming them."""
    buffers = [torch.zeros((len(ids), *pool.shape[1:]), dtype=pool.dtype) for ids in layout]
    return [(ids, buffer.data_ptr()) for ids, buffer in zip(layout, buffers, strict=True)], buffers


def _apply(copies: list[dma_batch.Copy]) -> None:
    for dst, src, nbytes in copies:
        ctypes.memmove(dst, src, nbytes)


def _geometry(pool: torch.Tensor) -> tuple[int, int, int, int]:
    return pool.data_ptr(), pool.stride(0) * pool.element_size(), pool[0].nbytes, pool.shape[0]


LAYOUTS = {
    "shuffled": lambda ids: [ids[i : i + 8] for i in range(0, 64, 8)],
    "adjacent": lambda ids: [list(range(i, i + 8)) for i in range(0, 64, 8)],
    "mixed": lambda ids: [[3, 4, 5, 9, 10, 2, 2 + 40, 7], [60, 61], [0]],
}


@pytest.mark.parametrize("strided", [False, True], ids=["packed", "strided"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_copies_to_host_gather_the_named_rows(row_copies: RowCopies, layout: str, strided: bool) -> None:
    pool = _pool(70, strided=strided)
    ids = list(range(64))
    random.Random(7).shuffle(ids)
    chunks, buffers = _chunks(pool, LAYOUTS[layout](ids))
    _apply(row_copies(*_geometry(pool), chunks, to_host=True))
    for (block_ids, _), buffer in zip(chunks, buffers, strict=True):
        assert torch.equal(buffer, pool[block_ids])


@pytest.mark.parametrize("strided", [False, True], ids=["packed", "strided"])
def test_copies_from_host_write_only_the_named_rows(row_copies: RowCopies, strided: bool) -> None:
    pool = _pool(70, strided=strided)
    before = pool.clone()
    chunks, buffers = _chunks(pool, LAYOUTS["mixed"](list(range(64))))
    for i, buffer in enumerate(buffers):
        buffer.fill_(-1 - i)
    _apply(row_copies(*_geometry(pool), chunks, to_host=False))
    written = {block for block_ids, _ in chunks for block in block_ids}
    for (block_ids, _), buffer in zip(chunks, buffers, strict=True):
        assert torch.equal(pool[block_ids], buffer)
    untouched = [row for row in range(pool.shape[0]) if row not in written]
    assert torch.equal(pool[untouched], before[untouched])
    if strided:  # the gaps between rows are not the pool's: never written
        base = pool.as_strided((pool.shape[0], 2, 12), (24, 12, 1))
        assert torch.equal(base[:, 1], torch.arange(70 * 24, dtype=torch.int32).view(70, 2, 12)[:, 1])


def test_packed_runs_are_one_copy_and_strided_rows_one_each(row_copies: RowCopies) -> None:
    chunks = [([4, 5, 6, 9, 10, 2], 1 << 20)]
    packed = row_copies(1 << 30, 48, 48, 70, chunks, to_host=True)
    assert packed == [(1 << 20, (1 << 30) + 4 * 48, 3 * 48), ((1 << 20) + 3 * 48, (1 << 30) + 9 * 48, 96),
                      ((1 << 20) + 5 * 48, (1 << 30) + 2 * 48, 48)]  # fmt: skip
    strided = row_copies(1 << 30, 96, 48, 70, chunks, to_host=False)
    assert [copy[2] for copy in strided] == [48] * 6
    assert strided[1] == ((1 << 30) + 5 * 96, (1 << 20) + 48, 48)  # pool side first: host to device


def test_the_two_implementations_agree_on_random_layouts() -> None:
    rng = random.Random(3)
    for _ in range(50):
        rows = rng.randint(1, 200)
        chunks = [
            ([rng.randrange(rows) for _ in range(rng.randint(0, 12))], rng.randint(1, 1 << 40))
            for _ in range(rng.randint(0, 10))
        ]
        for stride, to_host in ((64, True), (64, False), (128, True)):
            args = (1 << 41, stride, 64, rows, chunks)
            assert _native(*args, to_host=to_host) == dma_batch.row_copies_python(*args, to_host=to_host)


BAD = {
    "id past the pool": ([([1, 70], 5)], "chunk 0: block id 1 must be an int in [0, 70)"),
    "negative id": ([([2], 5), ([-1], 5)], "chunk 1: block id 0 must be an int in [0, 70)"),
    "bool id": ([([True], 5)], "chunk 0: block id 0 must be an int in [0, 70)"),
    "float id": ([([1.0], 5)], "chunk 0: block id 0 must be an int in [0, 70)"),
    "null host": ([([1], 0)], "chunk 0: the host address must be a non-null address"),
    "float host": ([([1], 5.0)], "chunk 0 must be a (block ids, host address) tuple"),
    "not a pair": ([[[1], 5]], "chunk 0 must be a (block ids, host address) tuple"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_chunks_are_refused_naming_what_is_wrong(row_copies: RowCopies, case: str) -> None:
    chunks, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        row_copies(1 << 30, 48, 48, 70, chunks, to_host=True)


def test_a_pool_whose_rows_overlap_is_refused(row_copies: RowCopies) -> None:
    with pytest.raises(ValueError, match="rows closer than their size"):
        row_copies(1 << 30, 32, 48, 70, [([1], 5)], to_host=True)


def test_row_copies_uses_the_c_builder_and_falls_back_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmcache import _dmabatch

    chunks = [([3, 1, 2], 1 << 20)]
    built: list[object] = []
    monkeypatch.setattr(_dmabatch, "row_copies", lambda *args: built.append(args) or [(1, 2, 3)])
    assert dma_batch.row_copies(1 << 30, 48, 48, 70, chunks, to_host=True) == [(1, 2, 3)]
    assert built == [(1 << 30, 48, 48, 70, True, chunks)]
    monkeypatch.setattr(dma_batch, "_native", None)
    expected = dma_batch.row_copies_python(1 << 30, 48, 48, 70, chunks, to_host=True)
    assert dma_batch.row_copies(1 << 30, 48, 48, 70, chunks, to_host=True) == expected
