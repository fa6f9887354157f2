"""Batches of host <-> device copies, each batch enqueued by one call.

A store or load of a 16k-token prompt makes about a hundred DMA copies (a chunk's slot to or from
the pool or the device staging), and a layer-wise load one 2-D copy per chunk and layer group
(:mod:`lmcache.layered_load`). Enqueued one PyTorch or ctypes call at a time, each takes the GIL for a
view, a dispatch or a ctypes conversion, which TRT-LLM's executor thread then waits for
(benchmarks/RESULTS.md, D37 and D49). Here a batch is a list of copies enqueued with PyTorch's own
CUDA runtime (:mod:`lmcache.cudart`; ``cudaMemcpyAsync`` and ``cudaMemcpy2DAsync``, direction
``cudaMemcpyDefault``) by the C loops of ``lmcache._dmabatch`` (built by setup.py), which hold no GIL
while they call the runtime, or by this module's Python loops, the fallback and the reference.

Both check every copy before enqueueing any and drop empty copies; 1-D copies that continue the
previous one on both sides are joined (L1 hands out slots in address order, and a batch's staging
is contiguous: a batch mostly moves as one copy). The caller keeps the memory alive until the
copies ran (an event recorded after them).

Where the runtime has CUDA 13's ``cudaMemcpyBatchAsync`` and the stream is not the legacy default
stream (which that call refuses), a 1-D batch is one call of it: the copy engine then takes many
small copies (one per scattered pool row) nearly as fast as one big one, with no kernel on the SMs
(benchmarks/RESULTS.md, D51). Its copies run in stream order as a batch, in no order among
themselves: a batch never names one destination twice.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmcache import cudart
from lmcache.logging import init_logger

try:
    # The loops in C without the GIL (lmcache/_dmabatch.c); optional, the Python loops below are the
    # fallback and the reference.
    from lmcache import _dmabatch as _native
except ImportError:
    _native = None

logger = init_logger(__name__)
_told_python = False

Copy = tuple[int, int, int]
"""``(dst address, src address, nbytes)``: host or device memory on either side (unified addressing)."""

Copy2d = tuple[int, int, int, int, int, int]
"""``(dst, dst pitch, src, src pitch, width, height)``: ``height`` lines of ``width`` bytes, each
side's lines ``pitch`` bytes apart."""

Enqueue = Callable[[int, int, Sequence[Any]], int]
"""``(runtime function address, stream handle, copies) -> calls made``: one loop over a batch."""

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the addresses

MEMCPY_ASYNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
)
"""``cudaMemcpyAsync(dst, src, count, kind, stream)``'s C type."""

MEMCPY_2D_ASYNC = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
)
"""``cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream)``'s C type."""


class MemLocation(ctypes.Structure):
    """``cudaMemLocation``: a memory location hint (type 0: none)."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    """``cudaMemcpyAttributes``: when the source may be read, and where each side is."""

    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_hint", MemLocation),
        ("dst_loc_hint", MemLocation),
        ("flags", ctypes.c_uint),
    ]


SRC_ACCESS_ORDER_STREAM = 1  # cudaMemcpySrcAccessOrderStream: the source is read in stream order

MEMCPY_BATCH_ASYNC = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
)
"""``cudaMemcpyBatchAsync(dsts, srcs, sizes, count, attrs, attrs_idxs, num_attrs, stream)``'s C type
(CUDA 13; CUDA 12.8's had a failure index before the stream, and is not used)."""

BATCH_MIN_RUNTIME = 13000
"""The first runtime version (``cudaRuntimeGetVersion``) whose ``cudaMemcpyBatchAsync`` has the
signature above."""

LEGACY_DEFAULT_STREAMS = (0, 1)
"""Handles of the legacy default stream (``0`` and ``cudaStreamLegacy``): ``cudaMemcpyBatchAsync``
refuses them."""


class Dma2dUnavailable(RuntimeError):
    """No CUDA runtime with ``cudaMemcpy2DAsync`` could be found in this process."""


def native_loops() -> tuple[Enqueue, Enqueue, Enqueue] | None:
    """The C loops ``(enqueue, enqueue_2d, enqueue_batch)`` (None: ``lmcache._dmabatch`` is not built,
    and batches go through Python)."""
    return (_native.enqueue, _native.enqueue_2d, _native.enqueue_batch) if _native is not None else None


def _checked_runs(copies: Sequence[Copy]) -> list[list[int]]:
    """The copies as runs to enqueue: each checked first, empty ones dropped, continuations joined."""
    for i, copy in enumerate(copies):
        if not isinstance(copy, tuple) or len(copy) != 3:
            raise ValueError(f"copy {i} must be a (dst address, src address, nbytes) tuple")
        dst, src, nbytes = copy
        if not all(type(v) is int for v in copy) or dst < 0 or src < 0:
            raise ValueError(f"copy {i}: addresses must be non-negative ints, nbytes an int")
        if dst == 0 or src == 0:
            raise ValueError(f"copy {i}: a null address")
        if nbytes < 0:
            raise ValueError(f"copy {i}: nbytes {nbytes} is negative")
    runs: list[list[int]] = []
    for dst, src, nbytes in copies:
        if nbytes == 0:
            continue
        if runs:
            last = runs[-1]
            if last[0] + last[2] == dst and last[1] + last[2] == src:
                last[2] += nbytes
                continue
        runs.append([dst, src, nbytes])
    return runs


def _checked_2d(copies: Sequence[Copy2d]) -> list[Copy2d]:
    """The 2-D copies to enqueue: each checked first, empty ones dropped."""
    for i, copy in enumerate(copies):
        if not isinstance(copy, tuple) or len(copy) != 6:
            raise ValueError(f"copy {i} must be a (dst, dst pitch, src, src pitch, width, height) tuple")
        if not all(type(v) is int for v in copy):
            raise ValueError(f"copy {i}: every field must be an int")
        for k, value in enumerate(copy):
            if value < 0:
                raise ValueError(f"copy {i}: field {k} is negative ({value})")
        dst, dst_pitch, src, src_pitch, width, height = copy
        if dst == 0 or src == 0:
            raise ValueError(f"copy {i}: a null address")
        if height > 1 and (dst_pitch < width or src_pitch < width):
            raise ValueError(
                f"copy {i}: pitches {dst_pitch} and {src_pitch} must be at least the width {width}"
            )
    return [copy for copy in copies if copy[4] and copy[5]]


def _failed(what: str, i: int, calls: int, err: int) -> RuntimeError:
    return RuntimeError(f"{what} (call {i + 1} of {calls}) failed with CUDA error {err}")


def enqueue_python(memcpy_async: int, stream: int, copies: Sequence[Copy]) -> int:
    """The reference loop: what ``lmcache._dmabatch.enqueue`` does, one ctypes call per run."""
    if not memcpy_async:
        raise ValueError("a null memcpy_async address")
    runs = _checked_runs(copies)
    fn = MEMCPY_ASYNC(memcpy_async)
    for i, (dst, src, nbytes) in enumerate(runs):
        err = fn(dst, src, nbytes, MEMCPY_DEFAULT, stream)
        if err:
            raise _failed(f"cudaMemcpyAsync of {nbytes} bytes", i, len(runs), err)
    return len(runs)


def enqueue_batch_python(memcpy_batch_async: int, stream: int, copies: Sequence[Copy]) -> int:
    """The reference: what ``lmcache._dmabatch.enqueue_batch`` does, the runs of :func:`enqueue_python`
    in one ``cudaMemcpyBatchAsync`` call (none when nothing is left); returns the calls made."""
    if not memcpy_batch_async:
        raise ValueError("a null memcpy_batch_async address")
    runs = _checked_runs(copies)
    if not runs:
        return 0
    count = len(runs)
    dsts = (ctypes.c_void_p * count)(*[run[0] for run in runs])
    srcs = (ctypes.c_void_p * count)(*[run[1] for run in runs])
    sizes = (ctypes.c_size_t * count)(*[run[2] for run in runs])
    attrs = MemcpyAttributes(SRC_ACCESS_ORDER_STREAM, MemLocation(0, 0), MemLocation(0, 0), 0)
    first = (ctypes.c_size_t * 1)(0)
    fn = MEMCPY_BATCH_ASYNC(memcpy_batch_async)
    err = fn(dsts, srcs, sizes, count, ctypes.byref(attrs), first, 1, stream)
    if err:
        raise RuntimeError(f"cudaMemcpyBatchAsync of {count} copies failed with CUDA error {err}")
    return 1


def enqueue_2d_python(memcpy_2d_async: int, stream: int, copies: Sequence[Copy2d]) -> int:
    """The reference loop: what ``lmcache._dmabatch.enqueue_2d`` does, one ctypes call per copy."""
    if not memcpy_2d_async:
        raise ValueError("a null memcpy_2d_async address")
    todo = _checked_2d(copies)
    fn = MEMCPY_2D_ASYNC(memcpy_2d_async)
    for i, (dst, dst_pitch, src, src_pitch, width, height) in enumerate(todo):
        err = fn(dst, dst_pitch, src, src_pitch, width, height, MEMCPY_DEFAULT, stream)
        if err:
            raise _failed(f"cudaMemcpy2DAsync of {height} x {width} bytes", i, len(todo), err)
    return len(todo)


RowChunk = tuple[Sequence[int], int]
"""``(block ids, host address)``: a chunk whose rows lie back to back in host memory from the address,
row ``j`` being the pool's row ``block_ids[j]``."""


def row_copies_python(
    pool: int, row_stride: int, row_bytes: int, num_rows: int, chunks: Sequence[RowChunk], *, to_host: bool
) -> list[Copy]:
    """The reference of :func:`row_copies`: the same copies, built by a Python loop."""
    if not pool or row_bytes <= 0 or row_stride < row_bytes:
        raise ValueError("row_copies: a null pool, no row bytes, or rows closer than their size")
    copies: list[Copy] = []
    packed = row_stride == row_bytes
    for c, chunk in enumerate(chunks):
        if not isinstance(chunk, tuple) or len(chunk) != 2 or type(chunk[1]) is not int:
            raise ValueError(f"chunk {c} must be a (block ids, host address) tuple")
        block_ids, host = chunk
        if host <= 0:
            raise ValueError(f"chunk {c}: the host address must be a non-null address")
        for j, block in enumerate(block_ids):
            if type(block) is not int or not 0 <= block < num_rows:
                raise ValueError(f"chunk {c}: block id {j} must be an int in [0, {num_rows})")
        j = 0
        while j < len(block_ids):
            first, run = block_ids[j], 1
            while packed and j + run < len(block_ids) and block_ids[j + run] == first + run:
                run += 1
            host_at, pool_at, nbytes = host + j * row_bytes, pool + first * row_stride, run * row_bytes
            copies.append((host_at, pool_at, nbytes) if to_host else (pool_at, host_at, nbytes))
            j += run
    return copies


def row_copies(
    pool: int, row_stride: int, row_bytes: int, num_rows: int, chunks: Sequence[RowChunk], *, to_host: bool
) -> list[Copy]:
    """The DMA copies between each chunk's host buffer and its rows of a pool at address ``pool`` of
    ``num_rows`` rows of ``row_bytes`` bytes, ``row_stride`` bytes apart: device to host if
    ``to_host``. Where rows are packed (``row_stride == row_bytes``) a run of adjacent block ids is one
    copy, else each row is. Every block id is checked to name a row first (ValueError). Built in C
    (``lmcache._dmabatch``) when it is built: a 16k-token store or load names hundreds of scattered
    rows, which a Python loop takes a visible share of the transfer's host time to list."""
    if _native is None:
        return row_copies_python(pool, row_stride, row_bytes, num_rows, chunks, to_host=to_host)
    return _native.row_copies(pool, row_stride, row_bytes, num_rows, to_host, chunks)


@functools.cache
def _runtime_function(name: str) -> int | None:
    """The address of the CUDA runtime's ``name`` in this process (None: no CUDA runtime, or none with it)."""
    library = cudart.runtime()
    fn = getattr(library, name, None) if library is not None else None
    return ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None


@functools.cache
def _batch_function() -> int | None:
    """The address of ``cudaMemcpyBatchAsync`` of the signature :data:`MEMCPY_BATCH_ASYNC` describes
    (None: no CUDA runtime, or one older than CUDA 13)."""
    library = cudart.runtime()
    if library is None:
        return None
    version = ctypes.c_int(0)
    if library.cudaRuntimeGetVersion(ctypes.byref(version)) != 0 or version.value < BATCH_MIN_RUNTIME:
        return None
    return _runtime_function("cudaMemcpyBatchAsync")


def batches_on(stream: Any) -> bool:
    """Whether :func:`enqueue` on ``stream`` makes one ``cudaMemcpyBatchAsync`` call (see the module)."""
    return stream.cuda_stream not in LEGACY_DEFAULT_STREAMS and _batch_function() is not None


def available_2d() -> bool:
    """Whether 2-D copies can be enqueued here (a CUDA device and the runtime's entry point)."""
    return torch.cuda.is_available() and _runtime_function("cudaMemcpy2DAsync") is not None


def _say_python_loops() -> None:
    """Once per process: a deployment missing the C loops should know why its copies hold the GIL."""
    global _told_python
    if _told_python:
        return
    _told_python = True
    logger.warning(
        "lmcache._dmabatch is not built: DMA copies are enqueued from Python, which holds the GIL "
        "longer per save and load (benchmarks/RESULTS.md, D49). Reinstall lmcache where a C compiler "
        "and the Python headers are present (pip install -e . builds it)."
    )


def enqueue(copies: Sequence[Copy], stream: Any) -> int:
    """Enqueue ``copies`` on the CUDA ``stream`` (a ``torch.cuda.Stream``), no two with one destination;
    returns how many runtime calls that took: one ``cudaMemcpyBatchAsync`` where :func:`batches_on`,
    else one ``cudaMemcpyAsync`` per run, in order."""
    if batches_on(stream):
        address = _batch_function()
        assert address is not None
        if _native is None:
            _say_python_loops()
            return enqueue_batch_python(address, stream.cuda_stream, copies)
        return _native.enqueue_batch(address, stream.cuda_stream, copies)
    address = _runtime_function("cudaMemcpyAsync")
    if address is None:
        raise RuntimeError("no CUDA runtime with cudaMemcpyAsync in this process; copies need a CUDA device")
    if _native is None:
        _say_python_loops()
        return enqueue_python(address, stream.cuda_stream, copies)
    return _native.enqueue(address, stream.cuda_stream, copies)


def enqueue_2d(copies: Sequence[Copy2d], stream: Any) -> int:
    """Enqueue the 2-D ``copies`` on the CUDA ``stream``, in order; returns how many calls that took."""
    address = _runtime_function("cudaMemcpy2DAsync")
    if address is None:
        raise Dma2dUnavailable(
            "cudaMemcpy2DAsync was not found in this process's CUDA runtime (PyTorch linked it statically?); "
            "layer-wise loads are unavailable, set use_layerwise: false (LMCACHE_USE_LAYERWISE=false)"
        )
    if _native is None:
        _say_python_loops()
        return enqueue_2d_python(address, stream.cuda_stream, copies)
    return _native.enqueue_2d(address, stream.cuda_stream, copies)
