"""The copy step shared by every front door: pool rows <-> L1 slot views, batched.

The engine plans a store or a load as slots (:class:`StoreSlot`, :class:`LoadSlot`); whoever holds
the pool copies them with :class:`CopyBatcher`: the in-process engine into its own L1, the
cache server into a pool it mapped, a worker (:mod:`lmcache.server.shared_l1_worker`) into the
server's L1 slabs it mapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from lmcache import c_ops, cudart
from lmcache.forward_gate import FORWARD
from lmcache.keys import ChunkKey
from lmcache.layered_load import LayerReady, scatter_layers
from lmcache.layout import PoolLayout
from lmcache.row_dma_trial import settle_by_trial
from lmcache.storage.cpu_store import CachedChunk

T = TypeVar("T")


@dataclass(frozen=True)
class CopyStreams:
    """The CUDA streams one pool's copies run on: saves on ``store``, loads on ``load``, so that a
    save in flight and a load move both ways at once (on one stream the load would wait for the
    whole save, benchmarks/RESULTS.md, D57)."""

    store: Any
    load: Any

    @classmethod
    def for_pool(cls, pool: torch.Tensor) -> CopyStreams | None:
        """New streams on a CUDA pool's device; None for a CPU pool (its copies are done when enqueued)."""
        if not pool.is_cuda:
            return None
        return cls(cudart.new_stream(pool.device), cudart.new_stream(pool.device))

    def synchronize(self) -> None:
        """Wait for every copy enqueued on either stream."""
        self.store.synchronize()
        self.load.synchronize()

    def release(self) -> None:
        """Hand both streams back for the next pool (see :func:`lmcache.cudart.new_stream`)."""
        cudart.release_stream(self.store)
        cudart.release_stream(self.load)


class CopyStart(Protocol):
    """When a transfer's copies may start, decided after it began (a store: TRT-LLM's sampling must go
    first, :mod:`lmcache.integration.tensorrt_llm.save_fence`; a load into an exported pool: the
    worker's stream must be done with the blocks). Until ``released`` the transfer only prepares;
    ``wait()`` blocks until then and returns the CUDA event its copies follow (None: no device
    order)."""

    @property
    def released(self) -> bool: ...

    def wait(self) -> Any: ...


@dataclass(frozen=True)
class EventStart:
    """A :class:`CopyStart` known from the outset: the copies follow ``event`` (None: no order)."""

    event: Any

    @classmethod
    def on(cls, stream: Any) -> EventStart:
        """The start after the work on ``stream`` so far (a CUDA stream)."""
        event = torch.cuda.Event()
        event.record(stream)
        return cls(event)

    @property
    def released(self) -> bool:
        return True

    def wait(self) -> Any:
        return self.event


@dataclass(slots=True)  # not frozen: built per chunk on the store path, where frozen init costs
class StoreSlot:
    """One chunk of a store: tokens ``[start, end)``, pool rows ``block_ids[first_block :
    first_block + rows]``. ``chunk`` is its reserved (unpublished) L1 slot; None when the chunk was
    already cached (skipped: nothing to copy)."""

    key: ChunkKey
    start: int
    end: int
    first_block: int
    rows: int
    chunk: CachedChunk | None

    def view(self, layout: PoolLayout) -> torch.Tensor:
        """The slot as ``rows`` pool rows."""
        assert self.chunk is not None
        return self.chunk.buffer.view(layout.dtype, (self.rows, *layout.row_shape))


@dataclass(slots=True)  # not frozen: built per chunk on the load path, where frozen init costs
class LoadSlot:
    """One chunk of a load, pinned: its rows ``[skip, stop)`` go to the pool rows
    ``block_ids[first_block + skip : first_block + stop]`` (a load may skip leading rows TRT-LLM
    already holds, and stop before a chunk's end)."""

    key: ChunkKey
    chunk: CachedChunk
    first_block: int
    rows: int
    skip: int
    stop: int

    def view(self, layout: PoolLayout) -> torch.Tensor:
        """The rows of the slot to copy."""
        view = self.chunk.buffer.view(layout.dtype, (self.rows, *layout.row_shape))
        return view if self.skip == 0 and self.stop == self.rows else view[self.skip : self.stop]


class CopyBatcher(Generic[T]):
    """Chunk copies enqueued a few at a time, so the DMA engine starts while the host prepares more.

    A store (``store=True``) gathers pool rows into slot views, a load scatters slot views into pool
    rows. The first chunk goes alone, so the DMA starts after one chunk's host work; each later batch
    is at most twice the one before, up to ``FLUSH_CHUNKS``: the host prepares a batch while the
    DMA engine moves the previous one (see benchmarks/RESULTS.md, D4 and D6). After each batch is enqueued,
    ``on_flush(items, event)`` gets the items added with it and an event after its copies (None on CPU).

    A load given ``layers`` is layer-wise (:mod:`lmcache.layered_load`): its first ``whole_first``
    chunks are copied whole as they come (in the same ramp), the rest only by :meth:`flush` and
    :meth:`finish`, layer group by layer group, after them; ``layers`` gets each layer's event.

    A store, or a whole load, given ``start`` queues its chunks without copying while ``start`` is not
    released (the host work of the whole transfer can then run before it); its first batch waits for
    ``start`` and follows its event on the device.

    ``guard`` is called right before each batch is enqueued; it raises to refuse the copies (the
    memory they read or write may no longer be the caller's).
    """

    FLUSH_CHUNKS = 8  # fewer host calls per byte than 4, same bandwidth (benchmarks/RESULTS.md, D6, D50)

    def __init__(
        self,
        pool: torch.Tensor,
        stream: Any = None,
        *,
        store: bool,
        block_ids: Sequence[int] | None = None,
        on_flush: Callable[[list[T], Any], None] | None = None,
        layers: LayerReady | None = None,
        whole_first: int = 0,
        start: CopyStart | None = None,
        guard: Callable[[], None] | None = None,
    ) -> None:
        if layers is not None and store:
            raise ValueError("only loads are layer-wise")
        if start is not None and layers is not None:
            raise ValueError("a layer-wise load waits for no start")
        # Stores interleave: their copies must not hold up the copy engine for TRT-LLM's own transfers.
        self.transfer = c_ops.Transfer(pool, stream, interleave=store, block_ids=block_ids)
        self.store = store
        self._on_flush = on_flush
        self._copies: list[c_ops.ChunkCopy] = []
        self._items: list[T] = []
        self._ready: list[Any] = []
        self._written: set[int] = set()
        """Pool rows a whole load has queued copies into."""
        self._waited: set[int] = set()
        """Ids of the events a load already waited for (its chunks' events stay alive meanwhile)."""
        self._flushes = 0
        self._layers = layers
        self._whole_left = whole_first if layers is not None else 0
        """First chunks of a layer-wise load still to be copied whole."""
        self._start = start
        """The transfer's start, until its first batch has waited for it."""
        self._guard = guard

    @classmethod
    def warm_up(cls, pool: torch.Tensor, stream: Any, rows_per_chunk: int) -> None:
        """Pay ``pool``'s one-off transfer set-up on ``stream`` now, at registration, with staging for a
        full batch of chunks of ``rows_per_chunk`` rows (see :meth:`lmcache.c_ops.Transfer.warm_up`),
        after settling how its scattered rows move on this card (:mod:`lmcache.row_dma_trial`)."""
        settle_by_trial(pool, stream, rows_per_chunk, cls.FLUSH_CHUNKS)
        c_ops.Transfer(pool, stream, interleave=True).warm_up(cls.FLUSH_CHUNKS * rows_per_chunk)

    def add(self, block_ids: Sequence[int], view: torch.Tensor, item: T, ready: Any = None) -> None:
        """Queue one chunk's copy; a load's ``ready`` event orders it after the copy that filled the
        slot. Flushes when the batch is full. A store first waits while a forward is being launched
        (:mod:`lmcache.forward_gate`)."""
        if self.store:
            FORWARD.wait()
        elif self._layers is None:
            if not self._written.isdisjoint(block_ids):
                # A row this load copies again (a chunk the server's reply names from another slot
                # than the lookup did): the copies queued so far go first, and the stream waits for
                # them, kernels included, so the later copy lands last (a batch keeps no order).
                self.flush()
                self.transfer.finish()
            self._written.update(block_ids)
        self._copies.append((block_ids, view))
        self._items.append(item)
        if ready is not None:
            self._ready.append(ready)
        batch = min(1 << self._flushes, self.FLUSH_CHUNKS)
        if self._layers is None:
            if len(self._copies) >= batch and (self._start is None or self._start.released):
                self.flush()
        elif self._whole_left and len(self._copies) >= min(batch, self._whole_left):
            self._whole_left -= len(self._copies)
            self._layers.went_layerwise = True  # the forward waits by layer for these too
            self._flush(layered=False)

    @property
    def layerwise(self) -> bool:
        """Whether this load is layer-wise (see the class)."""
        return self._layers is not None

    def prepare_index(self) -> None:
        """Upload the request's block ids now (see :meth:`lmcache.c_ops.Transfer.prepare_index`)."""
        self.transfer.prepare_index()

    def flush(self) -> None:
        """Enqueue the queued copies as one batch (of a layer-wise load: by layer, after every copy
        enqueued before)."""
        self._whole_left = 0
        self._flush(layered=self._layers is not None)

    def _flush(self, *, layered: bool) -> None:
        if not self._copies:
            return
        copies, items, ready = self._copies, self._items, self._ready
        self._copies, self._items, self._ready = [], [], []
        self._flushes += 1
        if self._start is not None:
            self._copy_after_start(copies, items, ready)
            return
        if self._guard is not None:
            self._guard()
        if self.store:
            self.transfer.gather(copies)
        elif layered:
            assert self._layers is not None
            self._wait_ready(ready)
            self.transfer.finish()  # the layers' events stand for the chunks copied whole before too
            scatter_layers(self.transfer.pool, self.transfer.stream, copies, self._layers)
        else:
            self._wait_ready(ready)
            self.transfer.scatter(copies)
        event = self.transfer.record()
        if self._on_flush is not None:
            self._on_flush(items, event)

    def _copy_after_start(self, copies: list[c_ops.ChunkCopy], items: list[T], ready: list[Any]) -> None:
        """The first copies, once the start lets them: every chunk queued until then, in batches of at
        most ``FLUSH_CHUNKS``; a store's each when no forward is being launched (as chunks added one by
        one wait, :mod:`lmcache.forward_gate`)."""
        assert self._start is not None
        after = self._start.wait()
        self._start = None
        if after is not None and self.transfer.cuda:
            self.transfer.stream.wait_event(after)  # before the transfer's first copy
        if not self.store:
            self._wait_ready(ready)
        for first in range(0, len(copies), self.FLUSH_CHUNKS):
            if first and self.store:
                FORWARD.wait()
            if self._guard is not None:
                self._guard()
            batch = copies[first : first + self.FLUSH_CHUNKS]
            if self.store:
                self.transfer.gather(batch)
            else:
                self.transfer.scatter(batch)
            if self._on_flush is not None:
                self._on_flush(items[first : first + self.FLUSH_CHUNKS], self.transfer.record())

    def finish(self) -> None:
        """Flush the rest; the transfer's stream is then ordered after every copy."""
        self.flush()
        self.transfer.finish()
        if self._layers is not None and self._layers.went_layerwise and self._layers.done is None:
            event = self.transfer.record()  # every copy went whole: each layer waits for them all
            if event is not None:
                self._layers.land_all(event)

    def abandon(self) -> None:
        """Give the batch up (its request failed): the copies queued but not enqueued are dropped, the
        transfer's stream is ordered after every one enqueued, helper streams included."""
        self._copies, self._items, self._ready = [], [], []
        self.transfer.finish()

    def _wait_ready(self, events: Sequence[Any]) -> None:
        """Order a load after the copies that filled its slots (on the device; on the host for CPU
        pools). Chunks stored together share an event: each is waited for once per load."""
        for ready in events:
            if id(ready) in self._waited:
                continue
            self._waited.add(id(ready))
            if self.transfer.cuda:
                self.transfer.stream.wait_event(ready)
            else:
                ready.synchronize()


class GuardedLanding(Generic[T]):
    """A guarded store's batches (``on_flush=landing.add``), published in order as their copies end,
    each once ``guard`` passes after its copies: what they read was still the caller's. Earlier batches
    are published while later ones copy, and none after ``guard`` raised."""

    def __init__(self, publish: Callable[[list[T]], None], guard: Callable[[], None]) -> None:
        self._publish = publish
        self._guard = guard
        self._landing: list[tuple[list[T], Any]] = []

    def add(self, items: list[T], event: Any) -> None:
        """A batch just enqueued, with the event after its copies (None: copied on the host)."""
        self._landing.append((items, event))

    def publish(self, *, wait: bool) -> None:
        """Publish the batches whose copies are done (``wait``: every one, waiting for each on the host)."""
        while self._landing:
            items, event = self._landing[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._guard()
            self._landing.pop(0)
            self._publish(items)
