"""A KV pool allocated the way TRT-LLM's KVCacheManagerV2 allocates its pools, for GPU tests.

V2 maps its pools with the CUDA virtual memory API: one address range (``cuMemAddressReserve``), one
``cuMemCreate`` allocation per mapping chunk, mapped into the range (``cuMemMap``) and opened to its
own device only (``cuMemSetAccess``); it asks for a fabric handle and falls back to none. Memory
like that has no legacy CUDA IPC handle, so the cache server cannot open it; the shared-memory L1
mode is the way a server serves such a pool. :func:`allocate_vmm_pool` builds one, with no
shareable handle type at all, so tests and benchmarks can check both facts on a GPU.

Needs a CUDA device and cuda-python (``cuda.bindings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lmcache.server.pool_sharing import legacy_ipc_capable
from lmcache.testing.cuda_pools import device_tensor

__all__ = ["VmmError", "allocate_vmm_pool", "legacy_ipc_capable"]

DEFAULT_MAPPING_BYTES = 64 << 20
"""Bytes per ``cuMemCreate`` allocation (V2's ``pool_size_granularity``), rounded to the granularity."""


class VmmError(RuntimeError):
    pass


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise VmmError("allocate_vmm_pool needs cuda-python (cuda.bindings)") from e
    return driver


def _ok(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise VmmError(f"{what} failed: {getattr(err, 'name', err)} ({int(err)})")
    return rest[0] if len(rest) == 1 else tuple(rest) if rest else None


@dataclass
class _Mapping:
    """What :func:`allocate_vmm_pool` mapped, released when the pool tensor is freed."""

    base: int
    size: int
    handles: list[Any]


def _release(driver: Any, mapping: _Mapping) -> None:
    _ok(driver.cuMemUnmap(driver.CUdeviceptr(mapping.base), mapping.size), "cuMemUnmap")
    for handle in mapping.handles:
        _ok(driver.cuMemRelease(handle), "cuMemRelease")
    _ok(driver.cuMemAddressFree(driver.CUdeviceptr(mapping.base), mapping.size), "cuMemAddressFree")


def allocate_vmm_pool(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | int = 0,
    *,
    mapping_bytes: int = DEFAULT_MAPPING_BYTES,
) -> torch.Tensor:
    """A zeroed tensor of ``shape`` and ``dtype`` in VMM memory with no shareable handle type.

    The mapping is released when the returned tensor (and every view of it) is freed.
    """
    driver = _driver()
    ordinal = device if isinstance(device, int) else (device.index or 0)
    torch.zeros(1, device=f"cuda:{ordinal}")  # makes the device's primary context current
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    prop.requestedHandleTypes = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
    granularity = int(
        _ok(
            driver.cuMemGetAllocationGranularity(
                prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            ),
            "cuMemGetAllocationGranularity",
        )
    )
    nbytes = math.prod(shape) * dtype.itemsize
    chunk = max(granularity, -(-mapping_bytes // granularity) * granularity)
    size = -(-nbytes // chunk) * chunk
    base = int(_ok(driver.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve"))
    mapping = _Mapping(base, size, [])
    try:
        for offset in range(0, size, chunk):
            handle = _ok(driver.cuMemCreate(chunk, prop, 0), "cuMemCreate")
            mapping.handles.append(handle)
            _ok(driver.cuMemMap(driver.CUdeviceptr(base + offset), chunk, 0, handle, 0), "cuMemMap")
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = ordinal
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        _ok(driver.cuMemSetAccess(driver.CUdeviceptr(base), size, [access], 1), "cuMemSetAccess")
    except BaseException:
        mapped = len(mapping.handles) * chunk
        if mapped:
            driver.cuMemUnmap(driver.CUdeviceptr(base), mapped)
        for handle in mapping.handles:
            driver.cuMemRelease(handle)
        driver.cuMemAddressFree(driver.CUdeviceptr(base), size)
        raise
    return device_tensor(base, shape, dtype, ordinal, lambda: _release(driver, mapping))
