"""L1 slabs a cache server hands its workers by file descriptor (``--l1-memory fd``), not by name.

Server side, :class:`FdSlabSource` makes each slab with the CUDA driver where the server has a
device whose driver makes host memory (``cuMemCreate`` on the device's host NUMA node, exportable):
page-locked once, as it is made, for every worker; a worker imports it without page-locking anything,
so its saves are not held up by page-locking while L1 first fills (benchmarks/RESULTS.md, D84).
Elsewhere a slab is a ``memfd``. Either way the source keeps one descriptor per live slab, closed
when the slab is freed; nothing is named in ``/dev/shm`` and nothing outlives the processes mapping it.

Worker side, :func:`map_descriptor` maps a descriptor the server's channel
(:mod:`lmcache.server.descriptor_channel`) passed, after checking it is what the server described.
"""

from __future__ import annotations

import os
import stat
import threading
import weakref

import torch

from lmcache import driver_host_memory, page_locking
from lmcache.memory import Slab, SlabSource
from lmcache.page_locking import Abandon, pin_in_place, populate
from lmcache.shm_slabs import MappedSlab, ShmSlabError, ShmSlabInfo, map_fd

__all__ = ["FdSlabSource", "KIND_CUDA", "KIND_MEMFD", "map_descriptor"]

KIND_CUDA = "cuda"
"""Made by the CUDA driver: imported with the driver (a CUDA worker only)."""
KIND_MEMFD = "memfd"
"""A ``memfd``: mapped (and page-locked by a CUDA worker, as a ``/dev/shm`` region is)."""


class FdSlabSource(SlabSource):
    """Slabs passed by descriptor (see the module docstring): driver-made for ``device`` where it can,
    memfd otherwise. ``channel`` is the socket workers ask for descriptors on (set by the server)."""

    def __init__(self, device: int | None) -> None:
        self._maker = driver_host_memory.maker(device)
        super().__init__(pinned=self._maker is not None)
        self.kind = KIND_CUDA if self._maker is not None else KIND_MEMFD
        self.driver_made = self._maker is not None
        self.memory = f"fd-{self.kind}"
        self.channel = ""
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: Abandon | None = None
    ) -> Slab:
        """A new slab of ``nbytes`` bytes and its descriptor; page-locked by its making when driver-made
        (``beside_transfers`` and ``abandon`` change nothing: nothing is registered)."""
        if self._closed:
            raise ShmSlabError("this L1 was closed (server shutting down)")
        if self._maker is not None:
            tensor, fd = self._maker.allocate_shared(nbytes)
        else:
            tensor, fd = _memfd_slab(nbytes)
        slab = Slab(self.new_id(), tensor)
        with self._lock:
            self._fds[slab.id] = fd
        weakref.finalize(slab, self._forget, slab.id)
        return self._track(slab)

    def _forget(self, slab_id: int) -> None:
        """The slab was freed: its descriptor goes (workers' mappings stay valid until they drop them)."""
        with self._lock:
            fd = self._fds.pop(slab_id, None)
        if fd is not None:
            os.close(fd)

    def descriptor(self, slab_id: int) -> int | None:
        """A new descriptor of the live slab ``slab_id`` (the caller's to close); None once it was freed.
        Duplicated under the lock that freeing takes: a number freed meanwhile never names another file."""
        with self._lock:
            fd = self._fds.get(slab_id)
            return None if fd is None else os.dup(fd)

    def describe(self, slab_id: int) -> ShmSlabInfo | None:
        """How a worker maps the live slab ``slab_id``; None once it was freed."""
        slab = self.slab(slab_id)
        if slab is None:
            return None
        return ShmSlabInfo(slab.id, "", slab.nbytes, kind=self.kind, channel=self.channel)

    def close(self) -> None:
        """Close every descriptor (idempotent); mappings already made, here and in workers, stay valid."""
        with self._lock:
            self._closed = True
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def _memfd_slab(nbytes: int) -> tuple[torch.Tensor, int]:
    fd = os.memfd_create("lmcache-l1", os.MFD_CLOEXEC)
    try:
        # Allocated, not only sized: without room it fails here, not with SIGBUS at a first touch.
        os.posix_fallocate(fd, 0, nbytes)
        return map_fd(fd, nbytes), fd
    except OSError as e:
        os.close(fd)
        raise ShmSlabError(
            f"cannot allocate a {nbytes >> 20} MiB L1 slab: {e.strerror}; lower --l1-size-gb"
        ) from None


def map_descriptor(
    info: ShmSlabInfo, fd: int, *, pin: bool, device: int | None, cpu_access: bool = True
) -> MappedSlab:
    """Map the slab ``info`` describes from ``fd`` (which stays the caller's). A driver-made slab is
    imported for ``device`` (it is page-locked already; for the CPU too unless not ``cpu_access``: a
    CUDA pool's worker copying on ``device`` alone), one import at a time in the process (in a
    registration's turn: granting access holds the driver as a registration does, and the copies
    enqueued meanwhile wait for every grant queued before them); a memfd is checked (a regular file of
    ``info.nbytes`` bytes) and mapped, then page-locked if ``pin``. ShmSlabError if it cannot be."""
    if info.kind == KIND_CUDA:
        if device is None and torch.cuda.is_available():  # a CPU pool's worker: its first device
            device = torch.cuda.current_device()
        maker = driver_host_memory.maker(device)
        if maker is None:
            raise ShmSlabError(
                "the server's L1 is CUDA driver memory, which this worker cannot import (no CUDA device, or "
                "a driver without host-memory allocations); start the server with --l1-memory shm"
            )
        try:
            with page_locking.GATE.registering():
                tensor = maker.import_shared(fd, info.nbytes, cpu_access=cpu_access)
        except driver_host_memory.DriverMemoryError as e:
            raise ShmSlabError(f"cannot import L1 slab {info.id} from the server: {e}") from None
        return MappedSlab(info, tensor, True)
    if info.kind != KIND_MEMFD:
        raise ShmSlabError(f"L1 slab {info.id} is of kind {info.kind!r}, which no descriptor carries")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != info.nbytes:
        raise ShmSlabError(
            f"the descriptor passed for L1 slab {info.id} is not a region of the {info.nbytes} bytes "
            "announced"
        )
    try:
        tensor = map_fd(fd, info.nbytes)
    except OSError as e:
        raise ShmSlabError(f"cannot map L1 slab {info.id} from the server: {e.strerror}") from None
    if pin:
        populate(tensor.data_ptr(), tensor.numel())
    return MappedSlab(info, tensor, pin and pin_in_place(tensor, fault_in=False))
