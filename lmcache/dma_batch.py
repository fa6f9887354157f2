"""A batch of host <-> device copies enqueued by one call.

A store or load of a 16k-token prompt makes about a hundred DMA copies (a chunk's slot to or from
the pool or the device staging). Enqueued one ``Tensor.copy_`` at a time, each holds the GIL for a
view, a slice and a dispatch, which TRT-LLM's executor thread then waits for (benchmarks/RESULTS.md,
D37 and D49). Here a batch is a list of ``(dst address, src address, nbytes)`` copies enqueued with
``cudaMemcpyAsync`` from PyTorch's own CUDA runtime (:mod:`lmcache.cudart`): by the C loop of
``lmcache._dmabatch`` (built by setup.py), which holds no GIL while it calls the runtime, or by this
module's Python loop, the fallback and the reference.

Both check every copy before enqueueing any, drop empty copies and join a copy that continues the
previous one on both sides (L1 hands out slots in address order, and a batch's staging is contiguous:
a batch mostly moves as one copy). The caller keeps the memory alive until the copies ran (an event
recorded after them).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any

from lmcache import cudart

try:
    # The loop in C without the GIL (lmcache/_dmabatch.c); optional, the Python loop below is the
    # fallback and the reference.
    from lmcache._dmabatch import enqueue as _native_enqueue
except ImportError:
    _native_enqueue = None

Copy = tuple[int, int, int]
"""``(dst address, src address, nbytes)``: host or device memory on either side (unified addressing)."""

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the addresses

MEMCPY_ASYNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
)
"""``cudaMemcpyAsync(dst, src, count, kind, stream)``'s C type."""

Enqueue = Callable[[int, int, Sequence[Copy]], int]
"""``(memcpy_async address, stream handle, copies) -> calls made``: one implementation of the batch."""


def native() -> Enqueue | None:
    """The C loop (None: ``lmcache._dmabatch`` is not built, and batches go through Python)."""
    return _native_enqueue


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


@functools.cache
def _function(address: int) -> Any:
    return MEMCPY_ASYNC(address)


def enqueue_python(memcpy_async: int, stream: int, copies: Sequence[Copy]) -> int:
    """The reference loop: what ``lmcache._dmabatch.enqueue`` does, one ctypes call per run."""
    if not memcpy_async:
        raise ValueError("a null memcpy_async address")
    runs = _checked_runs(copies)
    fn = _function(memcpy_async)
    for i, (dst, src, nbytes) in enumerate(runs):
        err = fn(dst, src, nbytes, MEMCPY_DEFAULT, stream)
        if err:
            raise RuntimeError(
                f"cudaMemcpyAsync of {nbytes} bytes (call {i + 1} of {len(runs)}) "
                f"failed with CUDA error {err}"
            )
    return len(runs)


@functools.cache
def _memcpy_async_address() -> int:
    library = cudart.runtime()
    fn = getattr(library, "cudaMemcpyAsync", None) if library is not None else None
    if fn is None:
        raise RuntimeError("no CUDA runtime with cudaMemcpyAsync in this process; copies need a CUDA device")
    address = ctypes.cast(fn, ctypes.c_void_p).value
    assert address is not None
    return address


def enqueue(copies: Sequence[Copy], stream: Any, implementation: Enqueue | None = None) -> int:
    """Enqueue ``copies`` on the CUDA ``stream`` (a ``torch.cuda.Stream``), in order; returns how many
    ``cudaMemcpyAsync`` calls that took. ``implementation``: the C loop where built, else Python."""
    run = implementation or _native_enqueue or enqueue_python
    return run(_memcpy_async_address(), stream.cuda_stream, copies)
