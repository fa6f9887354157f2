"""Strided (2-D) DMA between host and device memory: ``cudaMemcpy2DAsync`` from PyTorch's own CUDA
runtime, found among the libraries the process loaded.

PyTorch copies a strided host view to the device through a contiguous host temporary (a
synchronous copy). A layer-wise load (:mod:`lmcache.layered_load`) moves one layer's slice of every
row, which is a 2-D copy: ``height`` lines of ``width`` bytes, ``pitch`` bytes apart on each side.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from lmcache import cudart

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses


class Dma2dUnavailable(RuntimeError):
    """No CUDA runtime with ``cudaMemcpy2DAsync`` could be found in this process."""


@functools.cache
def _memcpy2d() -> Any:
    """``cudaMemcpy2DAsync`` of the runtime PyTorch loaded (see :func:`lmcache.cudart.runtime`)."""
    library = cudart.runtime()
    fn = getattr(library, "cudaMemcpy2DAsync", None) if library is not None else None
    if fn is None:
        raise Dma2dUnavailable(
            "cudaMemcpy2DAsync was not found in this process's CUDA runtime (PyTorch linked it statically?); "
            "layer-wise loads are unavailable, set use_layerwise: false (LMCACHE_USE_LAYERWISE=false)"
        )
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    fn.argtypes += [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return fn


def available() -> bool:
    """Whether 2-D copies can be enqueued here (a CUDA device and the runtime's entry point)."""
    if not torch.cuda.is_available():
        return False
    try:
        _memcpy2d()
    except Dma2dUnavailable:
        return False
    return True


def copy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: Any) -> None:
    """Enqueue on ``stream`` the copy of ``height`` lines of ``width`` bytes from address ``src`` (lines
    ``src_pitch`` apart) to ``dst`` (``dst_pitch`` apart); host or device memory on either side."""
    err = _memcpy2d()(dst, dst_pitch, src, src_pitch, width, height, _MEMCPY_DEFAULT, stream.cuda_stream)
    if err:
        raise RuntimeError(
            f"cudaMemcpy2DAsync of {height} x {width} bytes failed with CUDA error {err} "
            f"(pitches {src_pitch} -> {dst_pitch})"
        )
