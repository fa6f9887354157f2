"""Worker side of the shared-L1 mode: copies between this process's pool and the server's L1 slots.

The server names slots by slab id; every reply describes the slabs its slots lie in, mapped before
the copy, and the slabs not announced before, mapped ahead (:mod:`lmcache.server.slab_mappings`; the
copiers of one client share its mappings).
Copies run on the copier's own streams, one for stores and one for loads, so that a save in flight
and a load move both ways at once (on one stream the load would wait for the whole save); a store's
are complete when :meth:`SharedL1Copier.wait_stored` returns, a load's when
:meth:`SharedL1Copier.finish_load` returns or the event it returns has completed, a failed one's when
:meth:`SharedL1Copier.abandon` returns; the worker reports them done after that. The copier also
keeps the registration's lease (slots it may fill before it has asked for any, see
:mod:`lmcache.server.shared_l1`). A new server (another ``server_id``) drops every mapping and the
lease; a new registration (another capability) drops the lease.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmcache import c_ops
from lmcache.chunk_copy import CopyBatcher, CopyStart, CopyStreams
from lmcache.layered_load import LayerReady, whole_first
from lmcache.server import protocol as P
from lmcache.server.slab_mappings import SlabMappings
from lmcache.shm_slabs import SHM_DIR, ShmSlabError
from lmcache.transfer import BlockTransfer


class SharedL1Copier:
    """Copies for one registered pool (``[num_blocks, *row_shape]``) into and out of L1 slots."""

    def __init__(
        self,
        pool: torch.Tensor,
        *,
        slabs: SlabMappings | None = None,
        shm_dir: str = SHM_DIR,
    ) -> None:
        """``slabs``: the client's mappings of the server's slabs, shared with its other copiers (they
        must page-lock for a CUDA pool, and only then); None: this copier's own."""
        if slabs is not None and slabs.pin != pool.is_cuda:
            raise ValueError(
                f"a {'CUDA' if pool.is_cuda else 'CPU'} pool needs slab mappings with pin={pool.is_cuda}"
            )
        self.pool = pool
        self.row_bytes = math.prod(pool.shape[1:]) * pool.element_size()
        self.row_shape = tuple(pool.shape[1:])
        self._streams = CopyStreams.for_pool(pool)
        self.store_stream: Any = self._streams.store if self._streams is not None else None
        self.load_stream: Any = self._streams.load if self._streams is not None else None
        self.server_id: str | None = None
        self.slabs = slabs if slabs is not None else SlabMappings(pin=pool.is_cuda, shm_dir=shm_dir)
        if pool.is_cuda:
            self.slabs.bind(pool.device.index)
        self._owns_slabs = slabs is None
        self._cap: bytes | None = None
        self._leases: list[P.LeasedSlot] = []
        self._lock = threading.Lock()
        self._warm = False

    def warm_up(self, rows_per_chunk: int) -> None:
        """Pay the pool's one-off transfer set-up on its load stream now, at registration (see
        :meth:`lmcache.chunk_copy.CopyBatcher.warm_up`); once per copier."""
        if not self._warm:
            CopyBatcher.warm_up(self.pool, self.load_stream, rows_per_chunk)  # where scatters stage
            self._warm = True

    def on_server(self, server_id: str, cap: bytes | None = None) -> None:
        """The server this worker talks to and the instance's capability; another server (restarted)
        invalidates every mapping, another registration the lease."""
        self.slabs.on_server(server_id)
        with self._lock:
            if server_id != self.server_id:
                self._leases.clear()
                self.server_id = server_id
            if cap != self._cap:
                self._leases.clear()
                self._cap = cap

    # ---- the lease ------------------------------------------------------------------------------

    @property
    def leased(self) -> int:
        """Leased slots not handed out yet."""
        return len(self._leases)

    def take_leases(self, count: int) -> tuple[list[P.LeasedSlot], bytes | None]:
        """Up to ``count`` leased slots, each for one full chunk, and the capability of the registration
        they were leased to; the caller names them in its ``store_done`` (they leave the lease either
        way)."""
        with self._lock:
            if self.slabs.server_id != self.server_id:
                # Another pool of this client registered with a new server (the mappings it shares
                # with this copier are that server's now): these slots are the old server's.
                self._leases.clear()
            taken, self._leases = self._leases[:count], self._leases[count:]
            return taken, self._cap

    def add_leases(self, reply: P.StoreSlots) -> None:
        """Map the reply's slabs and keep the slots it leased."""
        self.apply(reply)
        with self._lock:
            self._leases.extend(reply.leased)

    def drop_leases(self) -> None:
        """The server no longer holds this lease (it restarted, or forgot the instance)."""
        with self._lock:
            self._leases.clear()

    # ---- copies ---------------------------------------------------------------------------------

    @property
    def mapped_slabs(self) -> list[int]:
        return self.slabs.ids()

    def apply(self, reply: P.StoreSlots | P.LoadSlots) -> None:
        """Take in what the reply tells of the slabs: drop the freed ones, map those its slots lie in,
        map the new ones ahead."""
        self.slabs.apply(reply.slabs, reply.forget)
        self.map_ahead(reply.ahead)

    def map_ahead(self, slabs: Sequence[P.SlabInfo]) -> None:
        """Map (and page-lock) these slabs in the background: those a registration or a reply announced."""
        if slabs:
            self.slabs.map_ahead(slabs)

    def check_blocks(self, block_ids: Sequence[int], start: int, end: int, tokens_per_block: int) -> None:
        """Refuse bad ids of the blocks tokens ``[start, end)`` touch, before anything is asked of the
        server (see :func:`lmcache.c_ops.check_range_blocks`)."""
        c_ops.check_range_blocks(self.pool, block_ids, start, end, tokens_per_block)

    def begin_store(
        self,
        block_ids: Sequence[int],
        after: CopyStart | None = None,
        guard: Callable[[], None] | None = None,
    ) -> CopyBatcher[None]:
        """A store's copies, ordered after ``after`` (the forward that computed the rows; waited for
        before the first copy, not before the chunks are queued), or without it after the work queued
        so far on the current stream of the pool's device; add chunks with :meth:`add` and
        :meth:`add_chunks`. ``guard`` runs before each batch is enqueued and raises if the slots may
        no longer be this process's."""
        if self.store_stream is not None and after is None:
            self.store_stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        return CopyBatcher(
            self.pool, self.store_stream, store=True, block_ids=block_ids, start=after, guard=guard
        )

    def add(self, batch: CopyBatcher[None], slot: P.SlotInfo, rows: Sequence[int]) -> None:
        """Queue the gather of the pool rows ``rows`` (block ids) into ``slot``."""
        batch.add(rows, self._view(slot, len(rows)), None)

    def add_chunks(self, batch: CopyBatcher[None], reply: P.StoreSlots, block_ids: Sequence[int]) -> None:
        """Queue the gathers of the chunks ``reply`` reserved (its slabs already mapped)."""
        for chunk in reply.chunks:
            if chunk.slot is not None:
                self.add(batch, chunk.slot, block_ids[chunk.first_block : chunk.first_block + chunk.rows])

    def finish_store(self, batch: CopyBatcher[None]) -> None:
        """Enqueue the rest of a store's ``batch``; its copies may still be running (see
        :meth:`wait_stored`)."""
        batch.finish()

    def wait_stored(self) -> None:
        """Wait until every store copy enqueued so far is done."""
        _synchronize(self.store_stream)

    def finish_load(self, batch: CopyBatcher[None], stream: Any = None, *, ordered: bool = True) -> Any:
        """Enqueue the rest of a load's ``batch``. Given the CUDA stream that reads the blocks next,
        order it after every copy (unless not ``ordered``: a layer-wise load's reader waits layer by
        layer), on the device, and return an event after them (the copies read the slots until it
        completes); else (or for a CPU pool) return None once every copy is done."""
        batch.finish()
        if stream is None or self.load_stream is None:
            _synchronize(self.load_stream)
            return None
        copied = torch.cuda.Event()
        copied.record(self.load_stream)
        if ordered:
            stream.wait_event(copied)
        return copied

    def abandon(self, batch: CopyBatcher[None]) -> None:
        """Give up a store's or load's ``batch`` (its request failed) and wait until every copy it
        enqueued is done, on every stream it used: before its slots are given back or unpinned, and
        before the failed request returns (no copy may then still read a slot or write a block)."""
        batch.abandon()
        _synchronize(batch.transfer.stream)

    def begin_load(
        self,
        block_ids: Sequence[int],
        after: Any = None,
        layers: LayerReady | None = None,
        chunks: int = 0,
        guard: Callable[[], None] | None = None,
    ) -> CopyBatcher[None]:
        """A load's copies, ordered after the work queued on the stream ``after`` (kernels that may
        still read the blocks), the block ids its kernels index uploaded at once (call it while the
        server's reply is on its way; rows moved by DMA need none); add the chunks of each reply part
        with :meth:`add_load`. Given ``layers``, the load of ``chunks`` chunks is layer-wise
        (:mod:`lmcache.layered_load`). ``guard``: as for :meth:`begin_store`."""
        if after is not None and self.load_stream is not None:
            self.load_stream.wait_stream(after)
        batch = CopyBatcher(
            self.pool,
            self.load_stream,
            store=False,
            block_ids=block_ids,
            layers=layers,
            whole_first=whole_first(chunks),
            guard=guard,
        )
        if layers is None:
            batch.prepare_index()
        return batch

    def add_looked_up(
        self,
        batch: CopyBatcher[None],
        slots: list[P.SlotInfo],
        transfer: BlockTransfer[Any],
        size: int,
        tpb: int,
    ) -> dict[int, P.LoadChunk]:
        """Queue the scatters of ``transfer``'s chunks from the slots a lookup pinned (``slots[i]``: the
        prompt's chunk ``i``, of ``size`` tokens), up to the first in a slab not mapped yet; returns
        them by first block, for :meth:`add_load` to skip those its reply names alike.

        A layer-wise ``batch`` is enqueued at once when the lookup named every chunk the load touches:
        its copies run while the reply travels, as one batch (a chunk the reply names otherwise lands
        in a second batch, after the whole first, and every layer waits for that too); otherwise it
        waits for the whole reply, so that each layer group of every chunk goes in one pass."""
        rows = size // tpb
        queued: dict[int, P.LoadChunk] = {}
        for i, slot in enumerate(slots):
            first = i * size
            if first + size <= transfer.start:
                continue
            if first >= transfer.end or self.slabs.get(slot.slab) is None:
                break
            # The prompt's last slot may hold a partial chunk (save_unfull_chunk): its rows alone.
            held = min(rows, slot.nbytes // self.row_bytes)
            skip = max(0, transfer.start - first) // tpb
            chunk = P.LoadChunk(i * rows, held, skip, min(held, (transfer.end - first) // tpb), slot)
            self._add_chunk(batch, chunk, transfer.block_ids)
            queued[chunk.first_block] = chunk
        if batch.layerwise and len(queued) == transfer.chunks_touched(size):
            batch.flush()
        return queued

    def names_every_chunk(self, slots: list[P.SlotInfo], transfer: BlockTransfer[Any], size: int) -> bool:
        """Whether a lookup's ``slots`` name a slot, in a slab mapped here, for every chunk of ``size``
        tokens that ``transfer`` touches (:meth:`add_looked_up` then queues them all)."""
        first, count = transfer.start // size, transfer.chunks_touched(size)
        touched = slots[first : first + count]
        return len(touched) == count and all(self.slabs.get(slot.slab) is not None for slot in touched)

    def add_load(
        self,
        batch: CopyBatcher[None],
        reply: P.LoadSlots,
        block_ids: Sequence[int],
        queued: dict[int, P.LoadChunk] | None = None,
    ) -> None:
        """Map the reply's slabs and queue the scatters of its chunks, but those ``queued`` already
        from the same slot, rows and filling (see :meth:`add_looked_up`)."""
        self.apply(reply)
        for chunk in reply.chunks:
            if queued and queued.get(chunk.first_block) == chunk:
                continue
            self._add_chunk(batch, chunk, block_ids)

    def _add_chunk(self, batch: CopyBatcher[None], chunk: P.LoadChunk, block_ids: Sequence[int]) -> None:
        if not 0 <= chunk.skip < chunk.stop <= chunk.rows:
            raise ShmSlabError(
                f"load rows [{chunk.skip}, {chunk.stop}) are not within a {chunk.rows}-row slot"
            )
        view = self._view(chunk.slot, chunk.rows)[chunk.skip : chunk.stop]
        batch.add(block_ids[chunk.first_block + chunk.skip : chunk.first_block + chunk.stop], view, None)

    def close(self) -> None:
        """Forget this copier's own mappings (they go once no view of them is left; shared ones stay
        with the client) and hand its streams back."""
        if self._owns_slabs:
            self.slabs.clear()
        if self._streams is not None:
            self._streams.release()

    def _view(self, slot: P.SlotInfo, rows: int) -> torch.Tensor:
        """The slot as ``rows`` pool rows, after checking it lies in a slab this worker mapped."""
        mapped = self.slabs.get(slot.slab)
        if self.slabs.server_id != self.server_id:  # read after the mapping: a switch before it shows
            # A new server's slabs are numbered anew: a slot this copier was given by the old one would
            # land in another chunk's memory there.
            raise ShmSlabError(
                f"slot of slab {slot.slab} was given by a cache server this worker no longer talks to"
            )
        if mapped is None:
            raise ShmSlabError(
                f"slot names slab {slot.slab}, which the server never described to this worker"
            )
        if (
            slot.nbytes != rows * self.row_bytes
            or slot.offset < 0
            or slot.offset % self.row_bytes  # slots of one size tile their slab from its start
            or slot.offset + slot.nbytes > mapped.info.nbytes
        ):
            raise ShmSlabError(
                f"slot of {slot.nbytes} bytes at {slot.offset} does not hold {rows} rows of {self.row_bytes} "
                f"bytes within slab {slot.slab} ({mapped.info.nbytes} bytes)"
            )
        first = slot.offset // self.row_bytes
        return mapped.slot_rows(self.pool.dtype, self.row_shape, first, rows)


def _synchronize(stream: Any) -> None:
    """Wait for ``stream``'s work (None: a CPU pool's copies, done when enqueued)."""
    if stream is not None:
        stream.synchronize()
