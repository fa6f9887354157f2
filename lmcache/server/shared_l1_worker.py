"""Worker side of the shared-L1 mode: copies between this process's pool and the server's L1 slots.

The server names slots by slab id; every reply describes the slabs its slots lie in
(:class:`~lmcache.server.protocol.SlabInfo`), and those not mapped yet are mapped with the checks of
:func:`lmcache.shm_slabs.map_slab` (owner, mode 0600, size), page-locked when the pool is on CUDA.
Copies run on the copier's own stream and are complete when :meth:`SharedL1Copier.store` or
:meth:`SharedL1Copier.load` returns, so the worker may report them done. A new server (another
``server_id``) drops every mapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lmcache.chunk_copy import CopyBatcher
from lmcache.server import protocol as P
from lmcache.shm_slabs import SHM_DIR, MappedSlab, ShmSlabError, ShmSlabInfo, map_slab


class SharedL1Copier:
    """Copies for one registered pool (``[num_blocks, *row_shape]``) into and out of L1 slots."""

    def __init__(self, pool: torch.Tensor, *, shm_dir: str = SHM_DIR) -> None:
        self.pool = pool
        self.shm_dir = shm_dir
        self.row_bytes = math.prod(pool.shape[1:]) * pool.element_size()
        self.stream: Any = torch.cuda.Stream(device=pool.device) if pool.is_cuda else None
        self.server_id: str | None = None
        self._slabs: dict[int, MappedSlab] = {}

    def on_server(self, server_id: str) -> None:
        """The server this worker talks to; another one (restarted) invalidates every mapping."""
        if server_id != self.server_id:
            self._slabs.clear()
            self.server_id = server_id

    @property
    def mapped_slabs(self) -> list[int]:
        return sorted(self._slabs)

    def apply(self, slabs: Sequence[P.SlabInfo], forget: Sequence[int]) -> None:
        """Drop the slabs the server freed, map the ones it announced."""
        for slab_id in forget:
            self._slabs.pop(slab_id, None)
        for info in slabs:
            if info.id not in self._slabs:
                desc = ShmSlabInfo(info.id, info.name, info.nbytes)
                self._slabs[info.id] = map_slab(desc, pin=self.pool.is_cuda, shm_dir=self.shm_dir)

    def store(self, reply: P.StoreSlots, block_ids: Sequence[int]) -> None:
        """Gather the pool rows of each reserved chunk into its slot; complete on return."""
        self.apply(reply.slabs, reply.forget)
        if self.stream is not None:  # after the forward that computed the rows
            self.stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        copier: CopyBatcher[None] = CopyBatcher(self.pool, self.stream, store=True, block_ids=block_ids)
        for chunk in reply.chunks:
            if chunk.slot is not None:
                rows = block_ids[chunk.first_block : chunk.first_block + chunk.rows]
                copier.add(rows, self._view(chunk.slot, chunk.rows), None)
        copier.finish()
        self._wait()

    def load(self, reply: P.LoadSlots, block_ids: Sequence[int]) -> int:
        """Scatter each chunk's rows ``[skip, stop)`` into the pool; complete on return. Returns the
        tokens loaded (``reply.loaded``)."""
        self.apply(reply.slabs, reply.forget)
        copier: CopyBatcher[None] = CopyBatcher(self.pool, self.stream, store=False, block_ids=block_ids)
        for chunk in reply.chunks:
            if not 0 <= chunk.skip < chunk.stop <= chunk.rows:
                raise ShmSlabError(
                    f"load rows [{chunk.skip}, {chunk.stop}) are not within a {chunk.rows}-row slot"
                )
            view = self._view(chunk.slot, chunk.rows)[chunk.skip : chunk.stop]
            rows = block_ids[chunk.first_block + chunk.skip : chunk.first_block + chunk.stop]
            copier.add(rows, view, None)
        copier.finish()
        self._wait()
        return reply.loaded

    def close(self) -> None:
        """Forget every mapping (they go once no view of them is left)."""
        self._slabs.clear()

    def _view(self, slot: P.SlotInfo, rows: int) -> torch.Tensor:
        """The slot as ``rows`` pool rows, after checking it lies in a slab this worker mapped."""
        mapped = self._slabs.get(slot.slab)
        if mapped is None:
            raise ShmSlabError(
                f"slot names slab {slot.slab}, which the server never described to this worker"
            )
        if (
            slot.nbytes != rows * self.row_bytes
            or slot.offset < 0
            or slot.offset + slot.nbytes > mapped.info.nbytes
        ):
            raise ShmSlabError(
                f"slot of {slot.nbytes} bytes at {slot.offset} does not hold {rows} rows of {self.row_bytes} "
                f"bytes within slab {slot.slab} ({mapped.info.nbytes} bytes)"
            )
        data = mapped.tensor[slot.offset : slot.offset + slot.nbytes]
        return data.view(self.pool.dtype).view(rows, *self.pool.shape[1:])

    def _wait(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
