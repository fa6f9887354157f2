"""A worker's mappings of the cache server's L1 slabs (shared-L1 mode).

A reply names the slabs its slots lie in (``slabs``): :meth:`SlabMappings.apply` maps those not
mapped yet before the worker copies, with the checks of :func:`lmcache.shm_slabs.map_slab` (owner,
mode 0600, size), page-locked for a CUDA pool. A reply also announces slabs the worker was not told
of yet (``ahead``): :meth:`SlabMappings.map_ahead` hands them to a background thread, so a save into a
new slab does not wait for its mapping and page-locking (a slab is mapped once either way; a copy
that needs a slab being mapped ahead waits for that one only, and maps one still queued itself).
Several threads map ahead at once (:data:`MAP_AHEAD_THREADS`): filling a slab's page tables is
per-thread work, which they overlap; page-locking itself takes the driver's lock, and so does importing
a slab the server's driver made (``--l1-memory fd``), which they do one at a time.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence

from lmcache.fd_slabs import map_descriptor
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.descriptor_channel import DescriptorChannelError, fetch_descriptors
from lmcache.shm_slabs import SHM_DIR, MappedSlab, ShmSlabError, ShmSlabInfo, map_slab

logger = init_logger(__name__)

__all__ = ["SlabMappings", "MAP_AHEAD_THREADS"]

MAP_AHEAD_THREADS = min(8, max(1, (os.cpu_count() or 2) // 2))
"""Threads mapping slabs ahead at most (as many as pin the in-process L1 ahead)."""


class SlabMappings:
    """The slabs of one server this worker mapped, by id; thread-safe. One per client (and
    page-locking), shared by its shared-L1 registrations: each pool copies into the same slabs, which
    are mapped and page-locked once however many pools (layer groups, regions) register."""

    def __init__(self, *, pin: bool, shm_dir: str = SHM_DIR) -> None:
        self.pin = pin
        self.shm_dir = shm_dir
        self._mapped: dict[int, MappedSlab] = {}
        self._pending: dict[int, threading.Event] = {}
        """Slabs queued or being mapped ahead, each with the event set once that is over."""
        self._queue: deque[ShmSlabInfo] = deque()
        self._generation = 0
        """Bumped by :meth:`clear` and a change of server: a mapping begun before is of the old server's
        memory, and is dropped."""
        self._freed: set[int] = set()
        """Slabs this server freed (:meth:`apply`'s ``forget``): a mapping of one still being made is
        dropped when it is done. Emptied with the mappings when the server changes."""
        self._lock = threading.Lock()
        self._threads = 0
        """Threads mapping ahead now."""
        self._idle = threading.Condition(self._lock)
        """Notified when the last of them ends."""
        self.server_id: str | None = None
        """The server the mappings are of (:meth:`on_server`)."""
        self._devices: tuple[int, ...] = ()
        """The devices copies through these mappings run on (:meth:`bind`); replaced, never changed in
        place, so it is read without the lock."""

    @property
    def device(self) -> int | None:
        """The one device copies through these mappings run on; None before :meth:`bind`, or with
        several (slabs are then mapped for the caller's device and the CPU, as a copy from another
        device must not fault)."""
        devices = self._devices
        return devices[0] if len(devices) == 1 else None

    def bind(self, device: int) -> None:
        """Copies through these mappings run on CUDA ``device`` (a CUDA pool's): with it the only one,
        slabs the server's driver made are imported for it alone. A second device drops every mapping
        (those made for the first alone), made again when next needed."""
        with self._lock:
            if device in self._devices:
                return
            self._devices = (*self._devices, device)
            pending = self._forget() if len(self._devices) == 2 else []
        for event in pending:
            event.set()

    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._mapped)

    def get(self, slab_id: int) -> MappedSlab | None:
        return self._mapped.get(slab_id)

    def apply(self, slabs: Sequence[P.SlabInfo], forget: Sequence[int]) -> None:
        """Drop the slabs the server freed; map those a copy is about to use (raises ShmSlabError if a
        region fails the checks, or if the server changed while one was being mapped: that mapping is
        of the old server's memory, which no copy may use)."""
        with self._lock:
            for slab_id in forget:
                self._mapped.pop(slab_id, None)
                self._freed.add(slab_id)
        for info in slabs:
            with self._lock:
                if info.id in self._mapped:
                    continue
                ahead = self._pending.get(info.id)
                if ahead is not None and self._unqueue(info.id):
                    # Still queued behind others: mapped here now, not after every slab before it.
                    del self._pending[info.id]
                    ahead.set()
                    ahead = None
            if ahead is not None:  # being mapped ahead right now: wait for that one only
                ahead.wait()
                if info.id in self._mapped:
                    continue
            device = self._device() if self.pin else None
            with self._lock:
                generation = self._generation
            mapped = self._map(_worker_info(info), device)
            with self._lock:
                if generation != self._generation:
                    raise ShmSlabError(
                        f"the cache server changed while L1 slab {info.id} was being mapped; the copy that "
                        "needed it was for the old server"
                    )
                self._mapped.setdefault(info.id, mapped)

    def _unqueue(self, slab_id: int) -> bool:
        """Take a slab off the map-ahead queue; False if it is not there (lock held)."""
        for queued in self._queue:
            if queued.id == slab_id:
                self._queue.remove(queued)
                return True
        return False

    def map_ahead(self, slabs: Sequence[P.SlabInfo]) -> None:
        """Map these slabs in the background (a failure is left to :meth:`apply`, if one is ever used)."""
        with self._lock:
            for info in slabs:
                if info.id not in self._mapped and info.id not in self._pending:
                    self._pending[info.id] = threading.Event()
                    self._queue.append(_worker_info(info))
            starting = min(MAP_AHEAD_THREADS - self._threads, len(self._queue))
            device = self._device() if self.pin and starting > 0 else None
            for _ in range(starting):
                # Not daemons: exiting while one is inside the CUDA driver (page-locking) aborts the
                # process; exit waits for the few slabs still queued instead.
                thread = threading.Thread(target=self._run, args=(device,), name="lmcache-map-ahead")
                try:
                    thread.start()
                except RuntimeError:  # cannot start threads (interpreter shutting down): apply() maps
                    break
                self._threads += 1

    def wait_ahead(self, timeout: float | None = None) -> bool:
        """Wait until no slab is left to map ahead; False on timeout (tests, benchmarks)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._threads == 0, timeout)

    def on_server(self, server_id: str) -> None:
        """The server these slabs are of: another one (restarted) invalidates every mapping; the same
        one (another registration sharing them) changes nothing."""
        with self._lock:
            if server_id == self.server_id:
                return
            self.server_id = server_id
            pending = self._forget()
        for event in pending:
            event.set()

    def clear(self) -> None:
        """Forget every mapping (another server): they go once no view of them is left."""
        with self._lock:
            pending = self._forget()
        for event in pending:  # whoever waits maps the slab itself
            event.set()

    def _forget(self) -> list[threading.Event]:
        """Drop every mapping and queued slab (lock held); returns the events of those pending."""
        self._generation += 1
        self._mapped.clear()
        self._freed.clear()
        self._queue.clear()
        pending, self._pending = self._pending, {}
        return list(pending.values())

    def _run(self, device: int | None) -> None:
        """Map queued slabs until none is left; counted in ``_threads`` until it ends, however."""
        counted = True
        try:
            if self.pin:  # page-locking: a CUDA worker's, where torch is loaded
                from lmcache import cudart

                # On the caller's device; TRT-LLM may be capturing its CUDA graphs meanwhile.
                cudart.relax_capture_mode(device)
            while True:
                with self._lock:
                    if not self._queue:  # uncounted under the lock that map_ahead() counts under
                        counted = False
                        self._threads -= 1
                        self._idle.notify_all()
                        return
                    info = self._queue.popleft()
                    generation = self._generation
                    event = self._pending.get(info.id)
                self._map_one(info, generation, event, device)
        finally:
            if counted:
                with self._lock:
                    self._threads -= 1
                    self._idle.notify_all()

    def _device(self) -> int | None:
        """The device slabs are mapped for: the bound one, else the caller's."""
        return self.device if self.device is not None else _caller_device()

    def _map(self, info: ShmSlabInfo, device: int | None) -> MappedSlab:
        """Map one slab: by its name in ``/dev/shm``, or by the descriptor the server's channel passes
        (ShmSlabError if the server holds it no more)."""
        if info.kind == "shm":
            return map_slab(info, pin=self.pin, shm_dir=self.shm_dir)
        try:
            fd = fetch_descriptors(info.channel, [info.id]).get(info.id)
        except DescriptorChannelError as e:
            raise ShmSlabError(str(e)) from None
        if fd is None:
            raise ShmSlabError(f"the server holds L1 slab {info.id} no more (freed since it was announced)")
        # Imported for the bound device alone (no CPU access, RESULTS D87); for any other device, with
        # CPU access as well, as a copy from another device must not fault.
        device_only = self.pin and device is not None and device == self.device
        try:
            return map_descriptor(info, fd, pin=self.pin, device=device, cpu_access=not device_only)
        finally:
            os.close(fd)

    def _map_one(
        self, info: ShmSlabInfo, generation: int, event: threading.Event | None, device: int | None
    ) -> None:
        mapped: MappedSlab | None = None
        try:
            mapped = self._map(info, device)
        except (ShmSlabError, OSError, RuntimeError) as e:  # freed meanwhile, or refused: apply() tells
            logger.debug("mapping L1 slab %d ahead failed: %s", info.id, e)
        with self._lock:
            if mapped is not None and generation == self._generation and info.id not in self._freed:
                self._mapped.setdefault(info.id, mapped)
            if event is not None and self._pending.get(info.id) is event:
                del self._pending[info.id]
        if event is not None:
            event.set()


def _worker_info(info: P.SlabInfo) -> ShmSlabInfo:
    return ShmSlabInfo(info.id, info.name, info.nbytes, kind=info.kind, channel=info.channel)


def _caller_device() -> int | None:
    """The device the thread asking for page-locked mappings works on (see :mod:`lmcache.cudart`)."""
    from lmcache import cudart

    return cudart.current_device()
