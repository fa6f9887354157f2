"""Page-locked host memory made by the CUDA driver itself, for L1 slabs made while transfers run.

Page-locking memory we allocated (``cudaHostRegister``) holds the driver's lock for milliseconds per
slab, and every copy the process enqueues meanwhile waits for it: saves that overlap L1's page-locking
lose up to half their speed (benchmarks/RESULTS.md, D80). Host memory the driver allocates through its
virtual-memory API (``cuMemCreate`` with a host NUMA location, mapped by ``cuMemMap`` and made
accessible to the device and the CPU by ``cuMemSetAccess``) is page-locked as it is made and holds up
no copy, but the driver makes it at a quarter of registration's rate. :class:`lmcache.memory.HostArena`
therefore pins with registration until transfers begin, then with this.

The driver is reached through ``libcuda`` by ctypes; :func:`maker` is None where it cannot be (no
driver, a driver without host-NUMA allocations, a host without NUMA).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref

import torch

from lmcache.logging import init_logger

logger = init_logger(__name__)

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_LOCATION_TYPE_HOST_NUMA = 3
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID = 134
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compression_type", ctypes.c_ubyte),
        ("gpu_direct_rdma_capable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requested_handle_types", ctypes.c_int),
        ("location", _Location),
        ("win32_handle_meta_data", ctypes.c_void_p),
        ("alloc_flags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class DriverMemoryError(RuntimeError):
    """A driver call failed (its name and CUDA error code in the message)."""


_U64 = ctypes.c_uint64
_SIGNATURES: dict[str, list[type]] = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuCtxGetCurrent": [ctypes.POINTER(ctypes.c_void_p)],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuMemGetAllocationGranularity": [
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(_AllocationProp),
        ctypes.c_int,
    ],
    "cuMemCreate": [ctypes.POINTER(_U64), ctypes.c_size_t, ctypes.POINTER(_AllocationProp), _U64],
    "cuMemAddressReserve": [ctypes.POINTER(_U64), ctypes.c_size_t, ctypes.c_size_t, _U64, _U64],
    "cuMemMap": [_U64, ctypes.c_size_t, ctypes.c_size_t, _U64, _U64],
    "cuMemSetAccess": [_U64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t],
    "cuMemUnmap": [_U64, ctypes.c_size_t],
    "cuMemAddressFree": [_U64, ctypes.c_size_t],
    "cuMemRelease": [_U64],
    "cuMemExportToShareableHandle": [ctypes.c_void_p, _U64, ctypes.c_int, _U64],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(_U64), ctypes.c_void_p, ctypes.c_int],
}


def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


class DriverHostMemory:
    """Makes page-locked host memory on ``device``'s host NUMA node, mapped for the device and the CPU."""

    def __init__(self, device: int) -> None:
        self._lib = _driver()
        self._call("cuInit", 0)
        handle = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(handle), device)
        numa = ctypes.c_int(-1)
        self._call("cuDeviceGetAttribute", ctypes.byref(numa), CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID, handle)
        if numa.value < 0:
            raise DriverMemoryError(f"device {device} reports no host NUMA node")
        self._context = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self._context), handle)
        self._prop = _AllocationProp(
            type=CU_MEM_ALLOCATION_TYPE_PINNED, location=_Location(CU_MEM_LOCATION_TYPE_HOST_NUMA, numa.value)
        )
        access = (_AccessDesc * 2)()
        access[0] = _AccessDesc(
            _Location(CU_MEM_LOCATION_TYPE_DEVICE, device), CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        )
        access[1] = _AccessDesc(
            _Location(CU_MEM_LOCATION_TYPE_HOST_NUMA, numa.value), CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        )
        self._access = access
        self._device_access = (_AccessDesc * 1)(access[0])
        """A mapping only the device reads and writes: granting it skips the CPU's page tables, most of an
        import's hold on the driver (benchmarks/RESULTS.md, D87)."""
        granularity = ctypes.c_size_t()
        self._call(
            "cuMemGetAllocationGranularity",
            ctypes.byref(granularity),
            ctypes.byref(self._prop),
            CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
        self.granularity = granularity.value
        self.numa_node = numa.value

    def _call(self, name: str, *args: object) -> None:
        err = getattr(self._lib, name)(*args)
        if err != 0:
            raise DriverMemoryError(f"{name} failed (CUDA error {err})")

    def _make_context_current(self) -> None:
        current = ctypes.c_void_p()
        self._call("cuCtxGetCurrent", ctypes.byref(current))
        if not current.value:  # a thread that made no CUDA call yet
            self._call("cuCtxSetCurrent", self._context)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of page-locked host memory as a uint8 CPU tensor; released when the tensor (and
        every view of it) is collected. DriverMemoryError if the driver refuses."""
        self._make_context_current()
        handle = _U64()
        self._call("cuMemCreate", ctypes.byref(handle), self._size(nbytes), ctypes.byref(self._prop), 0)
        return self._mapped(handle, nbytes)

    def allocate_shared(self, nbytes: int) -> tuple[torch.Tensor, int]:
        """:meth:`allocate`'s memory, exportable: the tensor and a new file descriptor of the memory
        (the caller's to close) that another process hands to :meth:`import_shared`; the memory lives
        while either the tensor or an import of it does."""
        self._make_context_current()
        prop = _AllocationProp(
            type=self._prop.type,
            requested_handle_types=CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            location=self._prop.location,
        )
        handle = _U64()
        self._call("cuMemCreate", ctypes.byref(handle), self._size(nbytes), ctypes.byref(prop), 0)
        fd = ctypes.c_int(-1)
        try:
            self._call(
                "cuMemExportToShareableHandle",
                ctypes.addressof(fd),
                handle,
                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        except DriverMemoryError:
            self._lib.cuMemRelease(handle)
            raise
        try:
            return self._mapped(handle, nbytes), fd.value
        except DriverMemoryError:
            os.close(fd.value)
            raise

    def import_shared(self, fd: int, nbytes: int, *, cpu_access: bool = True) -> torch.Tensor:
        """Map memory another process made by :meth:`allocate_shared` (``fd``, which stays the
        caller's) into this one, for this device and (``cpu_access``) the CPU, as :meth:`allocate`
        returns it: page-locked by its maker, so nothing is page-locked here. Without ``cpu_access`` only
        the device's copies may touch the tensor's bytes (the CPU reading them faults)."""
        self._make_context_current()
        handle = _U64()
        self._call(
            "cuMemImportFromShareableHandle",
            ctypes.byref(handle),
            ctypes.c_void_p(fd),
            CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
        return self._mapped(handle, nbytes, self._access if cpu_access else self._device_access)

    def _size(self, nbytes: int) -> int:
        return -(-nbytes // self.granularity) * self.granularity

    def _mapped(
        self, handle: ctypes.c_uint64, nbytes: int, access: ctypes.Array | None = None
    ) -> torch.Tensor:
        """Map the allocation ``handle`` (released if that fails) for ``access`` (default: the device and
        the CPU)."""
        access = self._access if access is None else access
        size = self._size(nbytes)
        address = _U64()
        undo = [lambda: self._lib.cuMemRelease(handle)]
        try:
            self._call("cuMemAddressReserve", ctypes.byref(address), size, self.granularity, 0, 0)
            undo.append(lambda: self._lib.cuMemAddressFree(address, size))
            self._call("cuMemMap", address, size, 0, handle, 0)
            undo.append(lambda: self._lib.cuMemUnmap(address, size))
            self._call("cuMemSetAccess", address, size, access, len(access))
        except DriverMemoryError:
            for step in reversed(undo):
                step()
            raise
        buffer = (ctypes.c_ubyte * nbytes).from_address(address.value)
        # The tensor keeps ``buffer`` alive; once both are gone the mapping and the memory go back.
        weakref.finalize(buffer, self.release, handle.value, address.value, size).atexit = False
        return torch.frombuffer(buffer, dtype=torch.uint8)

    def release(self, handle: int, address: int, size: int) -> None:
        """Unmap and free an allocation of :meth:`allocate`: its finalizer's call, on whichever thread
        collected the tensor (the device's context made current first); never for memory in use."""
        try:
            self._make_context_current()
        except DriverMemoryError as e:
            logger.warning("could not release a %d MiB host slab of the CUDA driver: %s", size >> 20, e)
            return
        self._lib.cuMemUnmap(address, size)
        self._lib.cuMemAddressFree(address, size)
        self._lib.cuMemRelease(handle)


_lock = threading.Lock()


@functools.cache
def _maker(device: int) -> DriverHostMemory | None:
    try:
        return DriverHostMemory(device)
    except (OSError, AttributeError, DriverMemoryError) as e:
        logger.debug("host memory from the CUDA driver is unavailable on device %d: %s", device, e)
        return None


def maker(device: int | None) -> DriverHostMemory | None:
    """The maker for ``device`` (None: no CUDA device, or the driver cannot make host memory there)."""
    if device is None or not torch.cuda.is_available():
        return None
    with _lock:
        return _maker(device)
