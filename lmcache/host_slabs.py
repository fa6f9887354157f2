"""How an L1 slab's host memory is made: private memory, page-locked one of two ways.

By registration: ``cudaHostAlloc`` (``torch.empty(..., pin_memory=True)``) of a whole slab holds the
CUDA driver's lock while it faults the pages in, stalling every other thread's copies. Instead, a slab
is allocated as ordinary memory, its pages are faulted in (``madvise``, no CUDA call, the GIL
released), and only then registered with ``cudaHostRegister``, which is shorter and barely disturbs
copies in flight; copy speed is the same either way (see benchmarks/RESULTS.md, D2 and D65;
:mod:`lmcache.page_locking`). It is unregistered when it is freed. A slab to be registered is an
anonymous mapping advised to use huge pages: faulting and registering 2 MiB pages is several times
faster than 4 KiB ones (D28).

Made by the driver (``beside_transfers``): a registration still holds the driver's lock, and every
copy the process enqueues meanwhile waits (D80); host memory the driver makes itself
(:mod:`lmcache.driver_host_memory`) holds up no copy, but comes slower, one slab at a time, in turn
with registrations (D81). Where the driver cannot make it, registration goes on.
"""

from __future__ import annotations

import contextlib
import mmap

import torch

from lmcache import cudart, driver_host_memory, page_locking
from lmcache.logging import init_logger
from lmcache.page_locking import pin_in_place

logger = init_logger(__name__)


def pinned_memory_available() -> bool:
    """Whether slabs can be page-locked here: a CUDA device is visible (page-locked memory is what
    copies to and from it run fastest with)."""
    return torch.cuda.is_available()


def allocate_slab(
    nbytes: int, pinned: bool, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
) -> torch.Tensor:
    """``nbytes`` of host memory, page-locked if ``pinned`` (see the module docstring for how);
    ``beside_transfers``: made by the CUDA driver where it can, holding up no copy of the process;
    ``abandon``: page-locking by registration gives up when it says so (``PageLockingAbandoned``)."""
    if not pinned:
        return torch.empty(nbytes, dtype=torch.uint8)
    if beside_transfers:
        tensor = driver_made(nbytes)
        if tensor is not None:
            return tensor
    tensor = huge_page_memory(nbytes)
    if not pin_in_place(tensor, abandon=abandon):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return tensor


def driver_made(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of page-locked memory the CUDA driver makes on this thread's device; None where it
    cannot (no maker there, or it refused: a DEBUG line)."""
    maker = driver_host_memory.maker(cudart.current_device())
    if maker is None:
        return None
    try:
        # In turn with page-locking by registration: interleaved, each holds the other up, and the
        # copies enqueued meanwhile wait for both.
        with page_locking.GATE.registering():
            return maker.allocate(nbytes)
    except driver_host_memory.DriverMemoryError as e:
        logger.debug("the CUDA driver did not make a %d MiB host slab: %s", nbytes >> 20, e)
        return None


def huge_page_memory(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh anonymous memory, advised to use transparent huge pages where the kernel
    allows it (THP ``madvise`` or ``always``); ordinary pages otherwise. The tensor keeps the mapping."""
    mapping = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE here: ordinary pages
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8)
