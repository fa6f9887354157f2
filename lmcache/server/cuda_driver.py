"""The CUDA driver API as the pool-sharing code needs it, through whichever bindings are installed.

Order of preference: cuda-python's ``cuda.bindings`` (``driver``, ``runtime``), then the older
``cuda.cuda`` / ``cuda.cudart`` modules, then the CUDA driver library (``libcuda.so.1``) through
ctypes (``LMCACHE_CUDA_IPC_BACKEND=ctypes`` forces it). Imported lazily: CPU-only machines never
load any of them. Failures raise :class:`PoolSharingError` naming the call that failed.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from lmcache.logging import init_logger

logger = init_logger(__name__)

__all__ = ["PoolSharingError", "CudaArray", "cuda_api", "CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE"]

CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
"""``CUpointer_attribute`` value: 1 if the pointer's allocation can be exported with ``cudaIpcGetMemHandle``
(``cudaMalloc`` memory), 0 for memory from ``cuMemCreate`` (VMM, e.g. KVCacheManagerV2's pools)."""


class PoolSharingError(ValueError):
    """A pool cannot be shared (client side) or a descriptor cannot be mapped (server side)."""


# ---- CUDA: the driver API, through whichever bindings are installed ----------------------------


def _cuda_python() -> tuple[Any, Any] | None:
    try:
        from cuda.bindings import driver, runtime

        return driver, runtime
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # cuda-python < 12.6
        from cuda import cudart as runtime

        return driver, runtime
    except ImportError:
        return None


class _CudaPythonApi:
    """cuda-python bindings: the runtime for IPC, the driver for address ranges and UUIDs."""

    name = "cuda-python"

    def __init__(self, driver: Any, runtime: Any) -> None:
        self.driver = driver
        self.runtime = runtime
        self._check(driver.cuInit(0), "cuInit")

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise PoolSharingError(f"{what} failed: {name} ({int(err)})")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def set_device(self, ordinal: int) -> None:
        self._check(self.runtime.cudaSetDevice(ordinal), "cudaSetDevice")

    def address_range(self, ptr: int) -> tuple[int, int]:
        base, size = self._check(self.driver.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
        return int(base), int(size)

    def ipc_get(self, base: int) -> bytes:
        handle = self._check(self.runtime.cudaIpcGetMemHandle(base), "cudaIpcGetMemHandle")
        return ctypes.string_at(handle.getPtr(), 64)

    def ipc_open(self, handle: bytes) -> int:
        h = self.runtime.cudaIpcMemHandle_t()
        ctypes.memmove(h.getPtr(), handle, 64)
        flags = self.runtime.cudaIpcMemLazyEnablePeerAccess
        return int(self._check(self.runtime.cudaIpcOpenMemHandle(h, flags), "cudaIpcOpenMemHandle"))

    def ipc_close(self, ptr: int) -> None:
        self._check(self.runtime.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def device_count(self) -> int:
        return int(self._check(self.driver.cuDeviceGetCount(), "cuDeviceGetCount"))

    def legacy_ipc_capable(self, ptr: int) -> bool:
        attribute = self.driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
        return bool(self._check(self.driver.cuPointerGetAttribute(attribute, ptr), "cuPointerGetAttribute"))

    def device_uuid(self, ordinal: int) -> str:
        dev = self._check(self.driver.cuDeviceGet(ordinal), "cuDeviceGet")
        uuid = self._check(self.driver.cuDeviceGetUuid(dev), "cuDeviceGetUuid")
        raw = uuid.bytes
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        return bytes(raw if isinstance(raw, (bytes, bytearray)) else [b & 0xFF for b in raw])[:16].hex()


class _CUipcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class _CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class _CtypesDriverApi:
    """The CUDA driver library through ctypes (no extra package; libcuda ships with the driver)."""

    name = "libcuda (ctypes)"

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise PoolSharingError(
                f"CUDA pool sharing needs cuda-python (pip install cuda-python) or the CUDA driver "
                f"library libcuda.so.1, neither is available: {e}"
            ) from None
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._check(self.lib.cuInit(0), "cuInit")

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(err, ctypes.byref(name))
            label = name.value.decode() if name.value else "unknown"
            raise PoolSharingError(f"{what} failed: {label} ({err})")

    def set_device(self, ordinal: int) -> None:
        ctx = self._contexts.get(ordinal)
        if ctx is None:
            dev = ctypes.c_int()
            self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
            ctx = ctypes.c_void_p()
            self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            self._contexts[ordinal] = ctx
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def address_range(self, ptr: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        fn = self.lib.cuMemGetAddressRange_v2
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self._check(fn(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
        return base.value, size.value

    def ipc_get(self, base: int) -> bytes:
        handle = _CUipcMemHandle()
        fn = self.lib.cuIpcGetMemHandle
        fn.argtypes = [ctypes.POINTER(_CUipcMemHandle), ctypes.c_uint64]
        self._check(fn(ctypes.byref(handle), base), "cuIpcGetMemHandle")
        return ctypes.string_at(ctypes.addressof(handle), 64)

    def ipc_open(self, handle: bytes) -> int:
        h = _CUipcMemHandle()
        ctypes.memmove(ctypes.addressof(h), handle, 64)
        ptr = ctypes.c_uint64()
        fn = self.lib.cuIpcOpenMemHandle_v2
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), _CUipcMemHandle, ctypes.c_uint]
        self._check(fn(ctypes.byref(ptr), h, 1), "cuIpcOpenMemHandle")  # 1: lazy peer access
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        fn = self.lib.cuIpcCloseMemHandle
        fn.argtypes = [ctypes.c_uint64]
        self._check(fn(ptr), "cuIpcCloseMemHandle")

    def legacy_ipc_capable(self, ptr: int) -> bool:
        value = ctypes.c_int()
        fn = self.lib.cuPointerGetAttribute
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        attribute = CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
        self._check(fn(ctypes.byref(value), attribute, ptr), "cuPointerGetAttribute")
        return bool(value.value)

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
        return n.value

    def device_uuid(self, ordinal: int) -> str:
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        uuid = _CUuuid()
        fn = getattr(self.lib, "cuDeviceGetUuid_v2", None) or self.lib.cuDeviceGetUuid
        self._check(fn(ctypes.byref(uuid), dev), "cuDeviceGetUuid")
        return bytes(uuid.bytes).hex()


_api: Any = None
_api_lock = threading.Lock()


def cuda_api() -> Any:
    """The CUDA binding in use (imported on first use)."""
    global _api
    with _api_lock:
        if _api is None:
            if os.environ.get("LMCACHE_CUDA_IPC_BACKEND", "").lower() != "ctypes" and (
                mods := _cuda_python()
            ):
                _api = _CudaPythonApi(*mods)
            else:
                _api = _CtypesDriverApi()
            logger.debug("CUDA IPC through %s", _api.name)
        return _api


class CudaArray:
    """A bare ``__cuda_array_interface__`` so ``torch.as_tensor`` can wrap a raw device pointer."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 2,
        }
