"""Block transfers between TensorRT-LLM's paged KV pool and contiguous chunk buffers.

A pool row (``pool[block]``: every layer, K then V) is contiguous, so a chunk is a handful of
rows, copied run by run of adjacent block ids on the CPU, where chunks whose host buffers follow
each other are joined first (``join_adjacent``). On CUDA a batch's copies are raw DMA enqueued by
one call (:mod:`lmcache.dma_batch`, which joins the copies that continue each other): rows
adjacent in the pool go straight to or from host memory; scattered rows are first gathered on the
device (one ``index_select`` per batch, or one ``index_copy_`` on the way back), at device-memory
speed, on a helper stream so these kernels overlap the copies. Stores may interleave their batches
over two streams so they never monopolise the copy engine. Everything is ordered by CUDA events
with no host sync; staging buffers are tied to the streams that use them. The host buffers must
stay allocated until the copies ran (L1's slots do: a slot is reused only after its events).

Pure PyTorch and the CUDA runtime PyTorch loaded: ``import lmcache.c_ops`` works on any machine,
with or without CUDA.
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from lmcache import cudart, dma_batch, row_dma_choice

# Upper bound of the device staging buffer per call, so a huge batch cannot exhaust GPU memory.
MAX_STAGING_BYTES = 256 << 20

LANE_SEGMENT_BYTES = 32 << 20
"""Bytes an interleaved store enqueues on one lane before it turns to the other: the copy engine's
switch points to other streams' copies (``Transfer._next_lane``) come at least this often, whatever
the batch size (benchmarks/RESULTS.md, D7 and D50)."""

ChunkCopy = tuple[Sequence[int], torch.Tensor]
"""Block ids of one chunk and its host buffer, shaped ``[len(block_ids), *pool.shape[1:]]``."""


def is_contiguous_run(block_ids: Sequence[int]) -> bool:
    """Whether the ids follow each other (compared in one list comparison, not id by id)."""
    first = block_ids[0]
    if block_ids[-1] - first != len(block_ids) - 1:
        return False
    ids = block_ids if isinstance(block_ids, list) else list(block_ids)
    return ids == list(range(first, first + len(ids)))


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of adjacent block ids as ``(offset in block_ids, first block, length)``."""
    runs: list[tuple[int, int, int]] = []
    for i, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            offset, first, length = runs[-1]
            runs[-1] = (offset, first, length + 1)
        else:
            runs.append((i, block, 1))
    return runs


def _joinable(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether ``after`` starts in host memory where ``before`` ends, in the same storage."""
    if before.data_ptr() + before.nbytes != after.data_ptr():
        return False
    if not (before.is_contiguous() and after.is_contiguous()):
        return False
    # Views of one slab share their base tensor: no storage objects to build (the common case).
    if before._base is not None and before._base is after._base:
        return True
    return before.untyped_storage().data_ptr() == after.untyped_storage().data_ptr()


def join_adjacent(chunks: Sequence[ChunkCopy]) -> list[ChunkCopy]:
    """Consecutive chunk copies whose host buffers follow each other in one storage, joined into one
    copy (their block ids concatenated, one view over both buffers).

    L1 hands out slots in address order, so the chunks of one prompt mostly sit back to back: a
    batch then moves as one DMA copy instead of one per chunk, with one set of host-side calls.
    """
    joined: list[ChunkCopy] = []
    run: list[ChunkCopy] = []
    for chunk in chunks:
        if run and not _joinable(run[-1][1], chunk[1]):
            joined.append(_join(run))
            run = []
        run.append(chunk)
    if run:
        joined.append(_join(run))
    return joined


def _join(run: list[ChunkCopy]) -> ChunkCopy:
    """One copy for chunks whose buffers follow each other (one view, built once per run)."""
    if len(run) == 1:
        return run[0]
    first = run[0][1]
    rows = sum(buf.shape[0] for _, buf in run)
    ids = [b for block_ids, _ in run for b in block_ids]
    return ids, first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def check_block_ids(pool: torch.Tensor, block_ids: Sequence[int]) -> None:
    if not block_ids:
        raise ValueError("a chunk copy needs at least one block id")
    lo, hi = min(block_ids), max(block_ids)
    if lo < 0 or hi >= pool.shape[0]:
        raise IndexError(f"block ids must be in [0, {pool.shape[0]}); got min {lo}, max {hi}")


def check_range_blocks(
    pool: torch.Tensor, block_ids: Sequence[int], start: int, end: int, tokens_per_block: int
) -> None:
    """Refuse bad ids of the blocks tokens ``[start, end)`` touch before any copy, so a bad request
    changes nothing. Entries outside the range are never read (``-1``, "no page", is allowed there:
    a sliding window's passed blocks, blocks TRT-LLM already holds)."""
    needed = -(-end // tokens_per_block)
    if len(block_ids) < needed:
        raise ValueError(f"{len(block_ids)} block ids cannot hold {end} tokens ({needed} blocks needed)")
    check_block_ids(pool, block_ids[start // tokens_per_block : needed])


def index_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    """``ids`` on ``device``, uploaded on the current stream (pinned, so the upload is asynchronous).

    Packed by ``struct`` straight into the pinned buffer: ``torch.tensor(list)`` delays the
    load's first copy, and an upload from pageable memory waits behind copies already in flight on
    the stream (see benchmarks/RESULTS.md, D10).
    """
    host = torch.empty(len(ids), dtype=torch.int64, pin_memory=device.type == "cuda")
    struct.pack_into(f"{len(ids)}q", host.numpy(), 0, *ids)
    return host.to(device, non_blocking=True)


_helper_streams: dict[tuple[str, int], Any] = {}
_helper_streams_lock = threading.Lock()


def _helper_stream(device: torch.device, role: str) -> Any:
    """One stream per device and role, created on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _helper_streams_lock:
        if (role, index) not in _helper_streams:
            _helper_streams[role, index] = cudart.new_stream(index)
        return _helper_streams[role, index]


Direction = Literal["gather", "scatter"]


def side_stream(device: torch.device, direction: Direction) -> Any:
    """The helper stream the gather (save) or scatter (load) kernels run on, one per device and
    direction. A scatter waits on its stream for its load's DMA: were gathers queued behind it on the
    same stream, every save would wait for the loads in flight and the two directions, which have
    copy engines of their own, would take turns (benchmarks/RESULTS.md, D43)."""
    return _helper_stream(device, direction)


def lane_stream(device: torch.device) -> Any:
    """The second stream of interleaved copies (see ``Transfer._next_lane``)."""
    return _helper_stream(device, "lane")


def _batches(chunks: Sequence[ChunkCopy], row_bytes: int) -> list[list[ChunkCopy]]:
    """Split chunks so each batch's device staging (rows of ``row_bytes``) stays under MAX_STAGING_BYTES."""
    batches: list[list[ChunkCopy]] = [[]]
    size = 0
    for chunk in chunks:
        nbytes = len(chunk[0]) * row_bytes
        if batches[-1] and size + nbytes > MAX_STAGING_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(chunk)
        size += nbytes
    return batches


def lane_segments(copies: list[dma_batch.Copy]) -> list[list[dma_batch.Copy]]:
    """``copies`` split in order into runs of at most ``LANE_SEGMENT_BYTES`` (a bigger copy alone)."""
    segments: list[list[dma_batch.Copy]] = []
    size = LANE_SEGMENT_BYTES
    for copy in copies:
        if size + copy[2] > LANE_SEGMENT_BYTES:
            segments.append([])
            size = 0
        segments[-1].append(copy)
        size += copy[2]
    return segments


class Transfer:
    """One store or load between ``pool`` and host buffers, enqueued batch by batch.

    DMA copies run on ``stream``. On CUDA the device-side gathers and scatters of scattered rows
    run on a helper stream, ordered by events, so the kernel for one batch overlaps the DMA of
    its neighbours instead of stalling the copy engine. ``finish()`` orders ``stream`` after all
    of it; until then the pool's scattered rows may still be in flight.

    ``block_ids``, the request's block ids when the chunk copies name consecutive slices of them,
    lets the device-side gathers and scatters index a single upload of that list instead of
    uploading each batch's ids (a host call and a small DMA between the big ones, per batch).

    ``row_dma`` forces how scattered rows move (one DMA each, or the kernels); by default as
    :mod:`lmcache.row_dma_choice` settled for the pool's device and row length.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        stream: Any = None,
        *,
        interleave: bool = False,
        block_ids: Sequence[int] | None = None,
        row_dma: bool | None = None,
    ) -> None:
        self.pool = pool
        self.cuda = pool.is_cuda
        self.stream = stream
        self._side: Any = None
        """The helper stream of this transfer's direction (set by its first gather or scatter)."""
        self._pool_ready: Any = None
        self._pending: Any = None
        self._lanes: list[Any] = []
        self._turns = 0
        self._last: Any = None
        self._restore: tuple[Any, ...] = ()
        self._current: Any = None
        """The stream made current by ``_use`` inside ``_streams`` (None: the caller's)."""
        self._side_waited = False
        self._gathered: Any = None
        self._copied: Any = None
        """Events a batch's kernel and copies hand over by (reused: see ``_gather_cuda``)."""
        self._row_bytes = math.prod(pool.shape[1:]) * pool.element_size()
        self._row_stride = pool.stride(0) * pool.element_size()
        """Bytes from one row to the next (rows are contiguous, possibly apart: PoolLayout)."""
        self._request_ids = list(block_ids) if block_ids is not None else None
        self._request_index: torch.Tensor | None = None
        self._cursor = 0
        self._device: torch.device | None = None
        """The pool's device when another is current here (copies are enqueued with it current)."""
        if self.cuda:
            # What ``_on`` puts back: the current streams of the current and of the pool's device.
            self._restore = (torch.cuda.current_stream(), torch.cuda.current_stream(pool.device))
            self.stream = stream if stream is not None else self._restore[1]
            self._lanes = [self.stream, lane_stream(pool.device)] if interleave else [self.stream]
            if torch.cuda.current_device() != pool.device.index:
                self._device = pool.device
        if row_dma is None and self.cuda:
            row_dma = row_dma_choice.uses_row_dma(pool.device.index, self._row_bytes)
        self._row_dma = (
            self.cuda and bool(row_dma) and all(dma_batch.batches_on(lane) for lane in self._lanes)
        )
        """Whether scattered rows move by one DMA each (:mod:`lmcache.row_dma_choice`), not by kernels."""

    @contextlib.contextmanager
    def _streams(self) -> Iterator[None]:
        """Around one public call: inside, ``_use`` switches the current stream only when it changes;
        on exit the caller's current streams are back. Like ``torch.cuda.stream`` without its per-use
        device and stream queries, a visible share of a transfer's host time (benchmarks/RESULTS.md,
        D11)."""
        try:
            yield
        finally:
            if self._current is not None:
                self._current = None
                torch.cuda.set_stream(self._restore[1])
                if self._restore[0] != self._restore[1]:
                    torch.cuda.set_stream(self._restore[0])

    def _use(self, stream: Any) -> None:
        """Make ``stream`` current (inside ``_streams``)."""
        if self._current is not stream:
            torch.cuda.set_stream(stream)
            self._current = stream

    @contextlib.contextmanager
    def _on(self, stream: Any) -> Iterator[None]:
        """``stream`` current for the block, the caller's streams after it."""
        with self._streams():
            self._use(stream)
            yield

    def _next_lane(self) -> Any:
        """The stream for the next batch of copies, ordered after the previous batch.

        With ``interleave``, batches alternate between two streams, each waiting for the one
        before: the copy engine then reaches a scheduling point at every batch boundary, where
        copies of other streams (TRT-LLM's sampled tokens) go first. On one stream the engine
        drains all queued copies before it turns to another stream's, so a small copy would wait
        for the whole save (see benchmarks/RESULTS.md, D7).
        """
        lane = self._lanes[self._turns % len(self._lanes)]
        self._turns += 1
        if self._last is not None:
            lane.wait_event(self._last)
        elif lane is not self.stream:
            lane.wait_event(self._pool_ready)
        return lane

    @property
    def row_dma(self) -> bool:
        """Whether scattered rows move by one DMA each, not by the gather and scatter kernels."""
        return self._row_dma

    @property
    def request_index(self) -> torch.Tensor | None:
        """The request's block ids on the pool's device, once a batch has used a slice of them."""
        return self._request_index

    def device_index(self, ids: list[int]) -> torch.Tensor:
        """``ids`` on the pool's device, enqueued on the current stream: a slice of the request's
        uploaded block ids when ``ids`` is one (found from where the previous batch ended), else a
        fresh upload."""
        known = self._request_ids
        if known is not None:
            try:
                at = known.index(ids[0], self._cursor)
            except ValueError:
                at = -1
            if at >= 0 and known[at : at + len(ids)] == ids:
                if self._request_index is None:
                    self._request_index = index_tensor(known, self.pool.device)
                self._cursor = at + len(ids)
                return self._request_index[at : at + len(ids)]
        return index_tensor(ids, self.pool.device)

    def prepare_index(self) -> None:
        """Upload the request's block ids now, on ``stream``: a caller with time to spare before its
        first copy (waiting for a server's reply) takes the upload off the load's path. Nothing to do
        when rows move by DMA (:mod:`lmcache.row_dma_choice`): no kernel reads the ids, and the upload would
        only delay the first copy."""
        if self.cuda and not self._row_dma and self._request_ids and self._request_index is None:
            with self._on(self.stream):
                self._request_index = index_tensor(self._request_ids, self.pool.device)

    def record(self) -> Any:
        """An event after every copy enqueued so far (None on CPU)."""
        if not self.cuda:
            return None
        if self._last is not None:
            return self._last
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def gather(self, chunks: Sequence[ChunkCopy]) -> None:
        """Copy the rows ``pool[block_ids]`` of each chunk into its buffer."""
        for block_ids, _ in chunks:
            check_block_ids(self.pool, block_ids)
        if not self.cuda:
            for block_ids, out in join_adjacent(chunks):
                for offset, first, length in block_runs(block_ids):
                    out[offset : offset + length].copy_(self.pool[first : first + length])
            return
        self._side_for("gather")
        if self._pool_ready is None:
            # The pool's rows hold their final values from here on ``stream`` (after the forward):
            # what gathers on other streams wait for. Loads never need it.
            self._pool_ready = torch.cuda.Event()
            self._pool_ready.record(self.stream)
        with self._streams():
            for batch in _batches(chunks, self._row_bytes):
                self._gather_cuda(batch)

    def _gather_cuda(self, chunks: Sequence[ChunkCopy]) -> None:
        direct: list[dma_batch.RowChunk] = []
        scattered = []
        for block_ids, out in chunks:
            if self._row_dma or is_contiguous_run(block_ids):
                direct.append((block_ids, self._host_address(out, len(block_ids))))
            else:
                scattered.append((block_ids, out))
        copies = self._row_copies(direct, to_host=True)
        staging = None
        if scattered:
            ids = [b for block_ids, _ in scattered for b in block_ids]
            if not self._side_waited:  # the helper stream's later work is after this wait too
                self._side.wait_event(self._pool_ready)
                self._side_waited = True
            self._use(self._side)
            staging = torch.index_select(self.pool, 0, self.device_index(ids))
            if self._gathered is None:
                self._gathered = torch.cuda.Event()
            # Reused: a stream's wait applies to the record made before it, not to later ones.
            self._gathered.record(self._side)
            at = staging.data_ptr()
            for block_ids, out in scattered:
                nbytes = len(block_ids) * self._row_bytes
                copies.append((self._host_address(out, len(block_ids)), at, nbytes))
                at += nbytes
        for segment in lane_segments(copies) if len(self._lanes) > 1 else [copies]:
            lane = self._next_lane()
            if staging is not None:
                lane.wait_event(self._gathered)
                staging.record_stream(lane)
            self._enqueue(segment, lane)
            self._end_batch(lane)

    def _host_address(self, buffer: torch.Tensor, rows: int) -> int:
        """The address of a chunk's host buffer, checked to hold ``rows`` pool rows back to back (its
        copies are raw DMA: a wrong size would read or write past it)."""
        nbytes = rows * self._row_bytes
        if buffer.dtype != self.pool.dtype or buffer.nbytes != nbytes or not buffer.is_contiguous():
            raise ValueError(
                f"a chunk buffer for {rows} rows of a {self.pool.dtype} pool must be contiguous "
                f"{self.pool.dtype} of {nbytes} bytes; got {buffer.dtype} "
                f"{tuple(buffer.shape)} strides {buffer.stride()}"
            )
        return buffer.data_ptr()

    def _row_copies(self, chunks: list[dma_batch.RowChunk], *, to_host: bool) -> list[dma_batch.Copy]:
        """The DMA copies between each chunk's host buffer and its pool rows (one per run of adjacent
        rows when the pool's rows are packed, else one per row)."""
        pool = self.pool
        return dma_batch.row_copies(
            pool.data_ptr(), self._row_stride, self._row_bytes, pool.shape[0], chunks, to_host=to_host
        )

    def _enqueue(self, copies: list[dma_batch.Copy], stream: Any) -> None:
        if not copies:
            return
        if self._device is None:
            dma_batch.enqueue(copies, stream)
            return
        with torch.cuda.device(self._device):
            dma_batch.enqueue(copies, stream)

    def _side_for(self, direction: Direction) -> None:
        """Take ``direction``'s helper stream; a transfer moves one way only."""
        side = side_stream(self.pool.device, direction)
        if self._side is not None and self._side is not side:
            raise ValueError("a Transfer either gathers (stores) or scatters (loads), not both")
        self._side = side

    def _end_batch(self, lane: Any) -> None:
        if len(self._lanes) > 1:
            self._last = torch.cuda.Event()
            self._last.record(lane)

    def scatter(self, chunks: Sequence[ChunkCopy]) -> None:
        """Copy each chunk's buffer into the rows ``pool[block_ids]``."""
        for block_ids, _ in chunks:
            check_block_ids(self.pool, block_ids)
        if not self.cuda:
            for block_ids, src in join_adjacent(chunks):
                for offset, first, length in block_runs(block_ids):
                    self.pool[first : first + length].copy_(src[offset : offset + length])
            return
        self._side_for("scatter")
        with self._streams():
            for batch in _batches(chunks, self._row_bytes):
                self._scatter_cuda(batch)

    def _scatter_cuda(self, chunks: Sequence[ChunkCopy]) -> None:
        pool, main = self.pool, self.stream
        direct: list[dma_batch.RowChunk] = []
        scattered = []
        self._use(main)
        for block_ids, src in chunks:
            host = self._host_address(src, len(block_ids))
            if self._row_dma or is_contiguous_run(block_ids):
                direct.append((block_ids, host))
            else:
                scattered.append((block_ids, host))
        copies = self._row_copies(direct, to_host=False)
        if not scattered:
            self._enqueue(copies, main)
            return
        ids = [b for block_ids, _ in scattered for b in block_ids]
        staging = torch.empty((len(ids), *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
        at = staging.data_ptr()
        for block_ids, host in scattered:
            nbytes = len(block_ids) * self._row_bytes
            copies.append((at, host, nbytes))
            at += nbytes
        self._enqueue(copies, main)
        # Uploaded in line with the chunks: a copy on the kernel stream would wait until the copy
        # engine drained every chunk queued on this one, holding every scatter back to the end.
        # After them: the DMA starts while the host prepares the ids (the kernel needs both).
        index = self.device_index(ids)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record(main)  # reused, as ``_gathered``
        self._side.wait_event(self._copied)
        self._use(self._side)
        pool.index_copy_(0, index, staging)
        self._pending = torch.cuda.Event()
        self._pending.record(self._side)
        staging.record_stream(self._side)
        index.record_stream(self._side)

    def warm_up(self, batch_rows: int) -> None:
        """Pay this pool's one-off CUDA set-up now and wait for it: cached staging for ``batch_rows``
        rows on ``stream`` (where scatters take theirs) and the gathers' helper stream, and the
        kernels, by one gather of two rows and their scatter into a scratch tensor (the pool is only
        read; this transfer is a gather from then on). A lazily loaded kernel, or a stream's first
        staging memory, synchronizes the whole device: a process's first load would wait for every
        stream's work (benchmarks/RESULTS.md, D36). Nothing to do on CPU or for a pool of fewer than
        three rows."""
        if not self.cuda or self.pool.shape[0] < 3:
            return
        rows = max(2, min(batch_rows, MAX_STAGING_BYTES // self._row_bytes))
        for stream in (self.stream, side_stream(self.pool.device, "gather")):
            with self._on(stream):
                # Freed at once: the caching allocator keeps the memory for this stream's staging.
                torch.empty(rows * self._row_bytes, dtype=torch.uint8, device=self.pool.device)
        # Block-id uploads take page-locked memory from PyTorch's host cache in power-of-two sizes, and
        # a new page-locked allocation is a device-wide barrier too: two of each size this pool's
        # requests can need (a save in flight holds one until its copies ran, a load beside it the
        # other), freed at once, so the cache holds them.
        count = 1
        while count < self.pool.shape[0]:
            count *= 2
            held = [torch.empty(count, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            del held
        ids = [0, 2]  # not adjacent: the index kernels, not one plain copy
        host = torch.empty((len(ids), *self.pool.shape[1:]), dtype=self.pool.dtype, pin_memory=True)
        self.gather([(ids, host)])
        self.finish()
        scratch = torch.empty((3, *self.pool.shape[1:]), dtype=self.pool.dtype, device=self.pool.device)
        scatter = Transfer(scratch, self.stream)
        scatter.scatter([(ids, host)])
        scatter.finish()
        self.stream.synchronize()

    def finish(self) -> None:
        """Order ``stream`` after every copy and scatter kernel of this transfer."""
        if self._last is not None:
            self.stream.wait_event(self._last)
        if self._pending is not None:
            self.stream.wait_event(self._pending)
            self._pending = None


def gather_to_host(pool: torch.Tensor, chunks: Sequence[ChunkCopy], stream: Any = None) -> None:
    """Copy the rows ``pool[block_ids]`` of each chunk into its buffer, enqueued on ``stream``."""
    transfer = Transfer(pool, stream)
    transfer.gather(chunks)
    transfer.finish()


def scatter_from_host(pool: torch.Tensor, chunks: Sequence[ChunkCopy], stream: Any = None) -> None:
    """Copy each chunk's buffer into the rows ``pool[block_ids]``, ordered before later work on ``stream``."""
    transfer = Transfer(pool, stream)
    transfer.scatter(chunks)
    transfer.finish()
