"""Pinned host memory for chunk buffers: a byte budget that grows lazily in slabs.

Asking the host allocator (``cudaHostAlloc``) per chunk is slow and fragments
pinned memory, so chunk buffers are fixed-size slots carved out of large slabs. Nothing is
reserved until the first slot is needed: a 10 GiB cap starts instantly.

How a slab's memory is made and page-locked: :mod:`lmcache.host_slabs`.

Growing ahead: page-locking is too slow to sit on the store path of a cold cache. So when a
pool hands out a slot of its newest slab and the budget has room, the next slab is allocated by a
background thread (one at a time per arena, its bytes counted against the cap before the
allocation starts), and is usually ready before the pool runs out. A pool that does run out
while its next slab is on the way takes a spare slab if there is one (pre-pinning's, below), else
waits for it instead of allocating another one. Reserved memory is thus at most one slab ahead of
use, and never above the cap.

Pinning from the start (:meth:`HostArena.prepin`): one slab ahead is not enough for a cold cache
taking long prompts back to back, so an engine with pinned memory also pins its whole budget in
the background from start-up, slab by slab, into spare slabs any pool takes when it grows. The
start stays instant; saves find memory already pinned instead of waiting for it. Empty slabs a
pool gives back return to the spares, still pinned.

Pinning beside transfers: once the arena has handed out its first slot, slabs made in the background
come from the CUDA driver (:func:`lmcache.host_slabs.allocate_slab`'s ``beside_transfers``), one at a
time, except while a pool waits for memory (D81); a slab pre-pinning was still faulting in or waiting
to register when transfers began is given up, and made by the driver instead (D82). Where every
slab is driver-made (a cache server's ``--l1-memory fd``), they are made one at a time from the start,
so a worker importing one waits behind one making at most (D105).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import weakref
from dataclasses import dataclass, field

import torch

from lmcache import cudart, page_locking
from lmcache.host_slabs import allocate_slab, pinned_memory_available
from lmcache.logging import init_logger

logger = init_logger(__name__)

DEFAULT_SLAB_BYTES = 256 << 20
SLABS_PER_CAPACITY = 8
"""Slabs are at most 1/8 of the cap: each chunk size has slabs of its own, so a size new to a full
cache frees a slab's worth of other chunks. (Smaller slabs would mean more pinning calls while a
cache fills; from a 2 GiB cap on, slabs are the default size.)"""
MIN_SLAB_BYTES = 4 << 20
PREPIN_THREADS = min(8, max(1, (os.cpu_count() or 2) // 2))
"""Faulting pages in is per-thread work, so several threads pin L1 faster, up to the host's memory
bandwidth; a start-up burst, on half the cores at most."""


@dataclass(frozen=True)
class SlotRef:
    """Where a slot lives: ``nbytes`` bytes at ``offset`` in the slab whose id is ``slab``."""

    slab: int
    offset: int
    nbytes: int


@dataclass(eq=False)
class Slab:
    """One block of host memory that slots are carved from; ``id`` is stable and unique per source."""

    id: int
    tensor: torch.Tensor
    name: str = ""
    """The shared-memory region's name (``/dev/shm/<name>``); empty for private memory."""

    _rows: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def rows(self, dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
        """The slab as whole rows (see :func:`rows_view`), built once per layout: a slot's view is
        then one slice of it."""
        cached = self._rows.get((dtype, row_shape))
        if cached is None:
            cached = self._rows[dtype, row_shape] = rows_view(self.tensor, dtype, row_shape)
        return cached


def rows_view(data: torch.Tensor, dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 tensor ``data`` as whole rows of ``row_shape`` in ``dtype`` (a tail too short for a
    row left out)."""
    row_bytes = dtype.itemsize * math.prod(row_shape)
    count = data.numel() // row_bytes
    return data[: count * row_bytes].view(dtype).view((count, *row_shape))


class SlabSource:
    """Where an arena's slabs come from: private host memory, page-locked if ``pinned``.

    Subclasses (:class:`lmcache.shm_slabs.ShmSlabSource`, :class:`lmcache.fd_slabs.FdSlabSource`)
    place slabs in shared memory. The source knows its live slabs by id (:meth:`slab`), for
    describing them to other processes.
    """

    memory = "private"
    """What the slabs are, as the server's stats name it: ``private`` (no other process maps them),
    ``shm`` (named ``/dev/shm`` regions), ``fd-cuda`` or ``fd-memfd`` (passed by descriptor)."""

    driver_made = False
    """Whether every slab is made by the CUDA driver (page-locked as it is made): the driver makes one
    at a time however many threads ask, and another process importing one of them waits behind every
    making queued before it (benchmarks/RESULTS.md, D88, D105)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._ids = itertools.count()
        self._live: weakref.WeakValueDictionary[int, Slab] = weakref.WeakValueDictionary()

    def allocate(
        self, nbytes: int, *, beside_transfers: bool = False, abandon: page_locking.Abandon | None = None
    ) -> Slab:
        """A new slab of ``nbytes`` bytes; ``beside_transfers``: made while copies run; ``abandon``:
        when its page-locking gives up (see :func:`allocate_slab`)."""
        tensor = allocate_slab(nbytes, self.pinned, beside_transfers=beside_transfers, abandon=abandon)
        return self._track(Slab(self.new_id(), tensor))

    def _track(self, slab: Slab) -> Slab:
        self._live[slab.id] = slab
        return slab

    def new_id(self) -> int:
        return next(self._ids)

    def slab(self, slab_id: int) -> Slab | None:
        """The live slab of that id; None once it was freed (or never existed)."""
        return self._live.get(slab_id)

    def live_ids(self) -> set[int]:
        return set(self._live.keys())

    def close(self) -> None:
        """Release what outlives the process (nothing for private memory)."""


@dataclass(eq=False, slots=True)
class HostBuffer:
    """One slot of a slab (``ref`` names it across processes). A pool keeps one per slot for the
    slab's life and hands the same object out at every reuse, so its typed view is built once."""

    pool: SlotPool
    slab: int
    """Index of the slab in its pool (``ref.slab`` is the slab's id)."""
    held: Slab
    ref: SlotRef
    _typed: tuple[torch.dtype, tuple[int, ...], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def data(self) -> torch.Tensor:
        """The slot's bytes, as uint8."""
        return self.held.tensor[self.ref.offset : self.ref.offset + self.ref.nbytes]

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot as ``dtype`` of ``shape`` (rows first). One slice of the slab's rows view when the
        slot starts on a row boundary (slots of one chunk size always do); the last view is kept, as a
        chunk is read and written with one layout all its life."""
        typed = self._typed
        if typed is not None and typed[0] == dtype and typed[1] == shape:
            return typed[2]
        row_bytes = dtype.itemsize
        for s in shape[1:]:
            row_bytes *= s
        if shape[0] * row_bytes > self.ref.nbytes:  # would read or write the next slot's chunk
            raise ValueError(
                f"a view of {shape[0]} rows of {row_bytes} bytes does not fit its {self.ref.nbytes}-byte slot"
            )
        offset = self.ref.offset
        if row_bytes and offset % row_bytes == 0:
            first = offset // row_bytes
            tensor = self.held.rows(dtype, shape[1:])[first : first + shape[0]]
        else:
            tensor = self.data[: shape[0] * row_bytes].view(dtype).view(shape)
        self._typed = (dtype, shape, tensor)
        return tensor


class SlotPool:
    """Fixed-size slots for one chunk size; O(1) allocate and free from a free list."""

    def __init__(self, arena: HostArena, slot_bytes: int) -> None:
        self.arena = arena
        self.slot_bytes = slot_bytes
        self._slabs: list[Slab | None] = []
        self._used: list[int] = []
        self._free: list[HostBuffer] = []
        self._newest = -1  # index of the slab attached last

    def allocate(self) -> HostBuffer | None:
        """A free slot, growing by one slab if the arena's budget allows; None when full."""
        arena = self.arena
        with arena.lock:
            while not self._free:
                growing = arena.growing
                spare = arena.take_spare(self.slot_bytes)  # pre-pinned: sooner than our slab on its way
                if spare is not None:
                    self.attach(spare)
                    break
                if growing is not self and self._grow():
                    break
                if growing is None and not arena.prepinning:
                    return None
                # Our next slab is on its way (or another pool's holds the budget we need, and may
                # give it back through reclaim once attached): wait for it rather than grow twice.
                arena.wait_grown()
            buf = self._free.pop()
            arena.serving = True
            self._used[buf.slab] += 1
            if buf.slab == self._newest:
                arena.grow_ahead(self)
            return buf

    def may_allocate(self) -> bool:
        """False when :meth:`allocate` would return None at once: no free slot, and the arena can
        neither grow nor expects a slab (a full cache then evicts without the attempt)."""
        with self.arena.lock:
            return bool(self._free) or self.arena.can_grow(self.slot_bytes)

    def free(self, buf: HostBuffer) -> None:
        with self.arena.lock:
            self._used[buf.slab] -= 1
            self._free.append(buf)

    def slab_used(self, index: int) -> int:
        """Slots of the pool's ``index``-th slab handed out and not freed (a :class:`HostBuffer`'s
        ``slab``)."""
        with self.arena.lock:
            return self._used[index]

    def release_empty_slabs(self) -> int:
        """Give wholly free slabs back to the arena's spares (when another chunk size needs them)."""
        released = 0
        with self.arena.lock:
            for i, slab in enumerate(self._slabs):
                if slab is not None and self._used[i] == 0:
                    released += slab.nbytes
                    self._slabs[i] = None
                    self._free = [buf for buf in self._free if buf.slab != i]
                    self.arena.add_spare(slab)
        return released

    def slab_slots(self) -> int:
        """Slots of the next slab within the arena's remaining budget (0: no room). Lock held."""
        room = self.arena.capacity_bytes - self.arena.reserved_bytes
        return min(max(1, self.arena.slab_bytes // self.slot_bytes), room // self.slot_bytes)

    def _grow(self) -> bool:
        """Allocate the next slab on the caller's thread (lock held); False if the budget is spent."""
        slots = self.slab_slots()
        if slots < 1:
            return False
        try:
            slab = self.arena.source.allocate(slots * self.slot_bytes)
        except (OSError, RuntimeError, ValueError) as e:  # no host memory left (e.g. a full /dev/shm)
            self.arena.stop_growing(e)
            return False
        self.arena.reserved_bytes += slab.nbytes
        self.attach(slab)
        return True

    def attach(self, slab: Slab) -> None:
        """Add an allocated slab (its bytes already counted in ``reserved_bytes``). Lock held."""
        index = self._slabs.index(None) if None in self._slabs else len(self._slabs)
        if index == len(self._slabs):
            self._slabs.append(slab)
            self._used.append(0)
        else:
            self._slabs[index] = slab
        # Pushed in reverse so the slab's slots are handed out in address order, after any free ones.
        self._free[:0] = [
            HostBuffer(self, index, slab, SlotRef(slab.id, k * self.slot_bytes, self.slot_bytes))
            for k in reversed(range(slab.nbytes // self.slot_bytes))
        ]
        self._newest = index


class HostArena:
    """The host-memory budget of the L1 tier, shared by one slot pool per chunk size.

    Slabs come from ``source`` (default: private memory, pinned if ``pinned``, which defaults to
    whether CUDA is available); ``pinned`` is then the source's.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        pinned: bool | None = None,
        slab_bytes: int | None = None,
        source: SlabSource | None = None,
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        if slab_bytes is None:
            slab_bytes = min(DEFAULT_SLAB_BYTES, max(MIN_SLAB_BYTES, capacity_bytes // SLABS_PER_CAPACITY))
        self.slab_bytes = slab_bytes
        if source is None:
            source = SlabSource(pinned_memory_available() if pinned is None else pinned)
        self.source = source
        self.pinned = source.pinned
        self.reserved_bytes = 0
        """Bytes of the slabs allocated, plus the one being allocated ahead (if any)."""
        self.lock = threading.RLock()
        self._pools: dict[int, SlotPool] = {}
        self._growing: SlotPool | None = None
        self._grown = threading.Condition(self.lock)
        self.grown_ahead = 0
        """Slabs allocated ahead of need by the background thread."""
        self._spares: list[Slab] = []
        """Allocated slabs no pool holds (counted in ``reserved_bytes``)."""
        self._prepinners = 0
        self.serving = False
        """Whether a slot was ever handed out: transfers have begun (slabs made from then on are made
        beside them, see the module)."""
        self._waiting = 0
        """Pools waiting for a slab (:meth:`wait_grown`)."""
        self._driver_making = False
        """A pre-pinning thread is making its slab beside transfers (:meth:`_take_driver_turn`)."""

    def add_capacity(self, nbytes: int) -> None:
        """Raise the budget by ``nbytes`` (slabs come on demand; a pre-pin that ended stays ended)."""
        with self.lock:
            self.capacity_bytes += nbytes

    def pool(self, slot_bytes: int) -> SlotPool:
        with self.lock:
            if slot_bytes not in self._pools:
                self._pools[slot_bytes] = SlotPool(self, slot_bytes)
            return self._pools[slot_bytes]

    def prepin(self) -> None:
        """Allocate (and pin, if ``pinned``) the whole budget in the background, slab by slab, as
        spares for the pools to take. Returns at once; see ``prepinning`` and :meth:`wait_prepinned`."""
        with self.lock:
            if self._prepinners:
                return
            self._prepinners = PREPIN_THREADS
        # Daemons: they may run for seconds and must not hold up the interpreter's exit; they never
        # wait inside torch (pages are faulted by madvise), so stopping them at exit is safe. Several,
        # since faulting pages in is per-thread work; registrations go one at a time anyway.
        device = cudart.current_device() if self.pinned else None
        for i in range(PREPIN_THREADS):
            threading.Thread(
                target=self._prepin, args=(device,), name=f"lmcache-prepin-{i}", daemon=True
            ).start()

    @property
    def prepinning(self) -> bool:
        """True while :meth:`prepin`'s threads are still allocating."""
        return self._prepinners > 0

    def _prepin(self, device: int | None) -> None:
        if self.pinned:  # on the starter's device; TRT-LLM may be capturing its CUDA graphs meanwhile
            cudart.relax_capture_mode(device)
        try:
            while True:
                with self.lock:
                    nbytes = min(self.slab_bytes, self.capacity_bytes - self.reserved_bytes)
                    if nbytes < self.slab_bytes:
                        return
                    self.reserved_bytes += nbytes  # counted first, as for a slab grown ahead
                    turn = self._take_driver_turn()
                    beside = turn and self.serving
                    # Only a registration begun before transfers gives way once they begin: one begun
                    # for a waiting pool would be restarted each time pools stop and start waiting.
                    gives_way = not beside and not self.serving
                try:
                    slab = self.source.allocate(
                        nbytes,
                        beside_transfers=beside,
                        abandon=self._registration_gives_way if gives_way else None,
                    )
                except page_locking.PageLockingAbandoned:  # transfers began: the driver makes it instead
                    with self.lock:
                        self.reserved_bytes -= nbytes
                    continue
                except Exception as e:  # out of pinned memory: pools allocate (and report) themselves
                    logger.warning("pinning L1 ahead stopped after %d MiB: %s", self.reserved_bytes >> 20, e)
                    with self.lock:
                        self.reserved_bytes -= nbytes
                        self._driver_making &= not turn
                    return
                with self.lock:
                    self._driver_making &= not turn
                    self.add_spare(slab)
        finally:
            with self.lock:
                self._prepinners -= 1
                self._grown.notify_all()

    def _take_driver_turn(self) -> bool:
        """Whether this background thread makes its slab in the driver's turn, and if so waits for that
        turn: beside transfers (see the module), and from the start where the source's slabs are all
        driver-made (the driver makes one at a time however many ask, and a worker importing a slab
        waits behind every making queued), so the others wait for the turn, unless a pool starts waiting
        for memory meanwhile (they register, or ask the driver at once, then). Lock held."""
        while self._one_at_a_time and self._driver_making:
            self._grown.wait()
        turn = self._one_at_a_time
        self._driver_making |= turn
        return turn

    @property
    def _one_at_a_time(self) -> bool:
        """Whether background slabs are made one at a time now (:meth:`_take_driver_turn`). Lock held."""
        return self.beside_transfers or (self.source.driver_made and not self._waiting)

    def _registration_gives_way(self) -> bool:
        """Whether a slab pre-pinning began to page-lock by registration before transfers began gives
        way to the driver's making now that they have (and no pool waits): registration left to run on
        would hold up the first saves' copies. Read without the lock: it is asked inside the
        page-locking gate's turns, which a pool growing under the lock may be waiting for."""
        return self.beside_transfers

    def wait_prepinned(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`prepin` is done; False on timeout."""
        with self.lock:
            return self._grown.wait_for(lambda: not self.prepinning, timeout)

    def add_spare(self, slab: Slab) -> None:
        """A slab no pool holds, its bytes already counted; pools waiting for memory are woken."""
        with self.lock:
            self._spares.append(slab)
            self._grown.notify_all()

    def take_spare(self, min_bytes: int) -> Slab | None:
        """A spare slab of at least ``min_bytes`` (lock held). When none is big enough and the budget
        is spent, the spares too small for this size are freed, so a slab of it can be allocated."""
        with self.lock:
            for i, slab in enumerate(self._spares):
                if slab.nbytes >= min_bytes:
                    return self._spares.pop(i)
            if self.capacity_bytes - self.reserved_bytes < min_bytes and self._spares:
                self.reserved_bytes -= sum(s.nbytes for s in self._spares)
                self._spares.clear()
            return None

    @property
    def spare_bytes(self) -> int:
        with self.lock:
            return sum(s.nbytes for s in self._spares)

    def reclaim(self, keep: SlotPool) -> int:
        """Release empty slabs of every pool but ``keep``; returns bytes released."""
        with self.lock:
            return sum(p.release_empty_slabs() for p in self._pools.values() if p is not keep)

    def can_grow(self, slot_bytes: int) -> bool:
        """Whether a pool of ``slot_bytes`` slots may get a slab now or soon: a spare, room in the
        budget, or a slab on its way (allocated ahead, or pre-pinned). Lock held."""
        return (
            bool(self._spares)
            or self.prepinning
            or self._growing is not None
            or self.capacity_bytes - self.reserved_bytes >= slot_bytes
        )

    @property
    def growing(self) -> SlotPool | None:
        """The pool whose next slab is being allocated ahead, if any. Lock held."""
        return self._growing

    def wait_grown(self) -> None:
        """Block until a slab allocated ahead is attached or abandoned (or pre-pinning moves on).
        Lock held; it is released while waiting."""
        self._waiting += 1
        if self._waiting == 1:  # pre-pinning threads waiting for the driver's turn register now
            self._grown.notify_all()
        try:
            self._grown.wait()
        finally:
            self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Pools waiting for a slab now."""
        with self.lock:
            return self._waiting

    @property
    def beside_transfers(self) -> bool:
        """Whether a slab started now in the background is made beside transfers: page-locked memory
        once they have begun, unless a pool waits for memory (then the faster way goes). Lock held."""
        return self.pinned and self.serving and not self._waiting

    def wait_growth(self, timeout: float | None = None) -> bool:
        """Wait until no slab is being allocated ahead; False on timeout (for tests and shutdown)."""
        with self.lock:
            return self._grown.wait_for(lambda: self._growing is None, timeout)

    def grow_ahead(self, pool: SlotPool) -> None:
        """Give ``pool`` its next slab: a spare if there is one, else start allocating it in the
        background, if none is on its way and the budget has room. Lock held."""
        spare = self.take_spare(pool.slot_bytes)
        if spare is not None:
            pool.attach(spare)
            return
        if self._growing is not None:
            return
        slots = pool.slab_slots()
        if slots < 1:
            return
        nbytes = slots * pool.slot_bytes
        self.reserved_bytes += nbytes  # counted now, so nothing else can take this budget meanwhile
        self._growing = pool
        # Not a daemon: exiting while it is inside torch or the CUDA driver (page-locking) aborts the
        # process ("terminate called without an active exception"); exit waits for it.
        device = cudart.current_device() if self.pinned else None
        thread = threading.Thread(
            target=self._allocate_ahead, args=(pool, nbytes, device), name="lmcache-slab-ahead"
        )
        try:
            thread.start()
        except RuntimeError:  # cannot start threads (interpreter shutting down)
            self.reserved_bytes -= nbytes
            self._growing = None

    def _allocate_ahead(self, pool: SlotPool, nbytes: int, device: int | None) -> None:
        if self.pinned:
            cudart.relax_capture_mode(device)
        slab = None
        with self.lock:
            turn = self._take_driver_turn()
            beside = turn and self.serving
        try:
            slab = self.source.allocate(nbytes, beside_transfers=beside)
        except Exception as e:  # e.g. out of pinned memory: the store path will try (and report) itself
            logger.warning("allocating a %d MiB host slab ahead of need failed: %s", nbytes >> 20, e)
        finally:
            with self.lock:
                self._driver_making &= not turn
                if slab is not None:
                    pool.attach(slab)
                    self.grown_ahead += 1
                else:
                    self.reserved_bytes -= nbytes
                self._growing = None
                self._grown.notify_all()

    def stop_growing(self, error: Exception) -> None:
        """The host refused a slab: the budget shrinks to what is already reserved, so L1 keeps
        serving (evicting within it) instead of failing every store on a new allocation."""
        with self.lock:
            if self.capacity_bytes <= self.reserved_bytes:
                return
            logger.warning(
                "L1 stays at %d MiB of its %d MiB: allocating more host memory failed (%s); chunks beyond "
                "it evict older ones",
                self.reserved_bytes >> 20,
                self.capacity_bytes >> 20,
                error,
            )
            self.capacity_bytes = self.reserved_bytes

    def slab(self, slab_id: int) -> Slab | None:
        """The live slab of that id (see :meth:`SlabSource.slab`)."""
        return self.source.slab(slab_id)

    def close(self) -> None:
        """Release what outlives the process (shared-memory names); slots stay usable in this one."""
        self.source.close()
