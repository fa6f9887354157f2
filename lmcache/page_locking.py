"""Page-locking host memory in the background without stopping the process's copies.

L1 is page-locked from start-up, in the background, while saves already copy into it: the in-process
arena's slabs (:mod:`lmcache.memory`) and a worker's mappings of the cache server's slabs
(:mod:`lmcache.shm_slabs`). Each slab goes through two steps:

- its pages are faulted in (:func:`populate`, ``MADV_POPULATE_WRITE``), by several threads at once,
  with the GIL released, a piece of :data:`FAULT_PIECE_BYTES` at a time;
- it is registered with the driver (``cudaHostRegister``), which holds the driver's lock, so every
  copy the process enqueues meanwhile waits.

The two take turns (:class:`PageLockGate`): a registration waits until the pieces being faulted are
done, and no new piece starts until it is over. Host memory the driver makes itself
(:mod:`lmcache.driver_host_memory`) takes a registration's turn. A registration of pages other
threads are still faulting in held the driver's lock many times longer than one alone, and every save
waited for it (benchmarks/RESULTS.md, D65). Faulting a piece at a time keeps a registration's wait
short, and keeps the process's memory-map lock, which faulting holds, free for the other threads
between pieces.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

from lmcache import cudart
from lmcache.logging import init_logger

logger = init_logger(__name__)

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux 5.14's ``madvise`` that faults a range in writable without touching its contents."""
FAULT_PIECE_BYTES = 16 << 20
"""Bytes faulted in by one call: what a registration may have to wait for, per faulting thread."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


class PageLockGate:
    """Faulting pages in (many threads at once) and registering memory (one at a time, alone) take
    turns; a registration waiting goes before new faulting."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._faulting = 0
        self._registering = False
        self._waiting = 0
        """Registrations waiting for the faulting in progress to end."""

    @contextlib.contextmanager
    def faulting(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._registering and not self._waiting)
            self._faulting += 1
        try:
            yield
        finally:
            with self._cond:
                self._faulting -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def registering(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._registering and self._faulting == 0)
            finally:
                self._waiting -= 1
            self._registering = True
        try:
            yield
        finally:
            with self._cond:
                self._registering = False
                self._cond.notify_all()


GATE = PageLockGate()
"""The process's gate: every slab of ours is faulted in and registered through it."""


class PageLockingAbandoned(Exception):
    """Page-locking stopped half-way because its caller's ``abandon`` said so; nothing was registered."""


Abandon = Callable[[], bool]
"""Asked before each piece is faulted in and once the registration's turn has come: True gives the
page-locking up (:class:`PageLockingAbandoned`). Called inside the gate's turns: it must not wait."""


def populate(address: int, nbytes: int, abandon: Abandon | None = None) -> bool:
    """Fault the mapped pages of ``[address, address + nbytes)`` in, writable, their contents kept
    (``MADV_POPULATE_WRITE``), a piece at a time through :data:`GATE`; False where the kernel cannot
    (before Linux 5.14). The GIL is released meanwhile: CPython's own ``mmap.madvise`` keeps it, which
    stops every other thread of the process (TRT-LLM's executor among them) for the whole of a slab.
    Fresh anonymous memory comes zeroed from the kernel, so faulting it in this way writes it once,
    not twice as a ``memset`` of faulted pages does. ``abandon``: see :data:`Abandon`."""
    for offset in range(0, nbytes, FAULT_PIECE_BYTES):
        with GATE.faulting():
            if abandon is not None and abandon():
                raise PageLockingAbandoned
            if _libc.madvise(address + offset, min(FAULT_PIECE_BYTES, nbytes - offset), MADV_POPULATE_WRITE):
                return False
    return True


def pin_in_place(tensor: torch.Tensor, *, fault_in: bool = True, abandon: Abandon | None = None) -> bool:
    """Page-lock the host memory of a contiguous uint8 ``tensor`` with ``cudaHostRegister``; False
    (and a DEBUG line) if the driver refuses. Unregistered once the tensor is collected.

    ``fault_in``: fault its pages in first (:func:`populate`; where the kernel cannot, by writing
    zeros: for fresh memory only), outside the driver's lock; False leaves them to the driver (memory
    another process filled: its contents are kept). ``abandon``: see :data:`Abandon`.
    """
    nbytes = tensor.numel()
    if fault_in and not populate(tensor.data_ptr(), nbytes, abandon):
        ctypes.memset(tensor.data_ptr(), 0, nbytes)
    with GATE.registering():
        if abandon is not None and abandon():
            raise PageLockingAbandoned
        err = cudart.register_host(tensor.data_ptr(), nbytes)
    if err != 0:
        logger.debug("cudaHostRegister of %d bytes failed (CUDA error %d)", nbytes, err)
        return False
    # Unregister once the memory is unused: when its storage goes, which every view of the slab keeps
    # (the tensor object itself may go first, while views still copy); not at interpreter exit, where
    # the process's end releases it anyway.
    storage = tensor.untyped_storage()
    weakref.finalize(storage, cudart.unregister_host, tensor.data_ptr()).atexit = False
    return True
