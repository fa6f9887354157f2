"""A KV pool allocated the way TRT-LLM's V1 KV cache manager allocates its pool, for GPU tests.

V1 takes its primary pool from a raw ``cudaMalloc``, outside PyTorch's caching allocator; such
memory has a legacy CUDA IPC handle, so the cache server can map it (the ``export`` pool-sharing
mode). :func:`allocate_cudamalloc_pool` builds one; its V2 counterpart (``cuMemCreate``, no IPC
handle) is :func:`lmcache.testing.vmm_pool.allocate_vmm_pool`. Both have the signature of the
replay's :data:`~lmcache.testing.trtllm_replay.PoolAllocator`.

Needs a CUDA device and cuda-python (``cuda.bindings``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from lmcache.server.pool_sharing import CudaArray


class CudaMallocError(RuntimeError):
    pass


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise CudaMallocError("allocate_cudamalloc_pool needs cuda-python (cuda.bindings)") from e
    return runtime


def _free(runtime: Any, ptr: int) -> None:
    (err,) = runtime.cudaFree(ptr)
    if int(err) != 0:
        raise CudaMallocError(f"cudaFree failed: {getattr(err, 'name', err)} ({int(err)})")


def allocate_cudamalloc_pool(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | int = 0
) -> torch.Tensor:
    """A zeroed tensor of ``shape`` and ``dtype`` in its own raw ``cudaMalloc`` allocation.

    The allocation is freed when the returned tensor (and every view of it) is freed.
    """
    runtime = _runtime()
    ordinal = device if isinstance(device, int) else (device.index or 0)
    torch.zeros(1, device=f"cuda:{ordinal}")  # makes the device's primary context current
    nbytes = math.prod(shape) * dtype.itemsize
    err, ptr = runtime.cudaMalloc(nbytes)
    if int(err) != 0:
        raise CudaMallocError(f"cudaMalloc({nbytes}) failed: {getattr(err, 'name', err)} ({int(err)})")
    return device_tensor(int(ptr), shape, dtype, ordinal, lambda: _free(runtime, int(ptr)))


def device_tensor(
    ptr: int, shape: tuple[int, ...], dtype: torch.dtype, ordinal: int, release: Callable[[], None]
) -> torch.Tensor:
    """A zeroed tensor of ``shape`` and ``dtype`` over raw device memory at ``ptr``; ``release`` runs
    once the tensor and every view of it are freed."""
    region = CudaArray(ptr, math.prod(shape) * dtype.itemsize)
    # The tensor's storage holds ``region`` until its last view is freed: release the memory then.
    weakref.finalize(region, release)
    raw = torch.as_tensor(region, device=f"cuda:{ordinal}")
    del region
    tensor = raw.view(dtype).view(shape)
    tensor.zero_()
    return tensor
