"""``store`` and ``retrieve``: the server copies between its L1 and a pool it opened itself (an exported
CUDA pool, mapped through CUDA IPC, or a CPU pool in shared memory), for a registered instance named
with its capability.

Every block id a request's token range touches is checked against the pool the server opened at
registration (ids outside the range may be -1, no page), and a store's ids must not repeat. The
copies of a request stop once its client may have given up (its blocks may be another request's by
then), and its pool's shared memory is checked again after them.

CUDA ordering (host-synchronous at the boundaries): the client must have finished writing the
blocks it asks to store before it sends ``store``, unless it names an event that ends that work,
which the server polls on the host before it copies (:mod:`lmcache.server.forward_events`); the
copies go on the instance's CUDA stream for saves, or for loads (apart, so that they overlap), and
that stream is synchronized before ``store`` and ``retrieve`` return. So when a ``store`` reply
arrives the client may overwrite those blocks, and when a ``retrieve`` reply arrives the loaded
blocks are in device memory, visible to any later work on any stream.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.keys import ChunkHashes
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.failures import ServiceFailure
from lmcache.server.forward_events import worker_forward
from lmcache.server.instances import Instance
from lmcache.server.pool_sharing import PoolSharingError
from lmcache.server.prompts import InvalidPrompt, request_prompt
from lmcache.transfer import BlockTransfer

if TYPE_CHECKING:
    from lmcache.server.service import CacheService

logger = init_logger(__name__)

__all__ = ["ExportTransfers"]


class ExportTransfers:
    """The ``store`` and ``retrieve`` handlers of ``service`` (served by every cache server)."""

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.engine = service.engine

    def _transfer_args(
        self, req: P.Store | P.Retrieve, inst: Instance
    ) -> BlockTransfer[np.ndarray | ChunkHashes]:
        """The request's transfer: its prompt (token ids, or the chunk hashes the client sent instead),
        salt, block ids and range."""
        blocks = P.ids_from_wire(req.block_ids, "block_ids")
        try:
            prompt = request_prompt(self.engine, inst.space, req)
        except InvalidPrompt as e:
            raise ServiceFailure(P.ErrorCode.INVALID, str(e)) from None
        # Only the blocks the range touches are read; others may be -1 (no page, e.g. a passed window).
        num_blocks = inst.space.layout.num_blocks
        tpb = inst.space.layout.tokens_per_block
        used = blocks[req.start // tpb : -(-req.end // tpb)]
        if len(used) and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
            raise ServiceFailure(
                P.ErrorCode.INVALID,
                f"block ids must be in [0, {num_blocks}) (the registered pool's blocks); got min "
                f"{int(used.min())}, max {int(used.max())}",
            )
        if isinstance(req, P.Store) and _repeats(used):
            self.service.counters.refuse("repeated_blocks")
            raise ServiceFailure(
                P.ErrorCode.INVALID, "block ids repeat: each block of a prompt holds distinct tokens"
            )
        if isinstance(inst.request.pool, P.SharedL1Pool):
            raise ServiceFailure(
                P.ErrorCode.INVALID,
                f"instance {inst.instance_id} registered its pool in the shared-l1 mode: the server cannot "
                "reach its blocks; send store_reserve / load and copy in the worker (CacheServerClient "
                "does this itself)",
            )
        self._check_pool(inst)
        return BlockTransfer(prompt, req.cache_salt, blocks.tolist(), req.start, req.end)

    def _check_pool(self, inst: Instance) -> None:
        """Refuse (and drop) an instance whose shared memory no longer backs its pool."""
        try:
            inst.pool.check()
        except PoolSharingError as e:
            self.service.counters.refuse("shrunk_pool")
            self.service.instances.retire_now(inst, "its shared memory changed under the server")
            raise ServiceFailure(P.ErrorCode.BAD_POOL, f"{e}; register the pool again") from None

    def store(self, req: P.Store, call: Call) -> int:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            transfer = self._transfer_args(req, inst)
            began = time.perf_counter()
            stream = inst.streams.store if inst.streams else None
            with worker_forward(inst.pool, inst.instance_id, req, call) as start:
                args = (inst.space, inst.rank, inst.pool.tensor, transfer, stream)
                stored = self.engine.store(*args, copy_start=start, guard=_in_time(call, "store"))
            _copies_done(inst, stream, "store", stored, began)  # the client may reuse the blocks then
            self._check_pool(inst)  # shrunk during the copy: what it read were zeros
            return stored

    def retrieve(self, req: P.Retrieve, call: Call) -> int:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            key = None if req.pin_id is None else self.service.pin_key(inst, req.pin_owner, req.pin_id)
            try:
                transfer = self._transfer_args(req, inst)
                began = time.perf_counter()
                stream = inst.streams.load if inst.streams else None
                with worker_forward(inst.pool, inst.instance_id, req, call) as start:
                    args = (inst.space, inst.rank, inst.pool.tensor, transfer, stream)
                    loaded = self.engine.retrieve(*args, guard=_in_time(call, "retrieve"), copy_start=start)
                _copies_done(inst, stream, "retrieve", loaded, began)  # the blocks are in place then
                self._check_pool(inst)
                return loaded
            finally:
                if key is not None:  # the blocks are loaded (or the load failed): the pins may go
                    call.after_reply(functools.partial(self.service.pins.rank_done, key, inst.rank))


def _repeats(ids: np.ndarray) -> bool:
    """Whether a value occurs twice in ``ids`` (by sorting: ``np.unique`` imports ``numpy.ma`` on its
    first call, a stall on a server's first store)."""
    ordered = np.sort(ids)
    return bool((ordered[1:] == ordered[:-1]).any())


def _in_time(call: Call, op: str) -> Callable[[], None]:
    """A copy batch's guard: once the client may have given up on the request, its blocks may be
    another request's (TRT-LLM reuses them): no further copy reads or writes them."""

    def check() -> None:
        if call.expiring():
            raise ServiceFailure(
                P.ErrorCode.EXPIRED,
                f"{op} ran past the client's timeout_ms, its blocks may be reused by now: the copies left "
                "were not made; the server is slow: retry, or raise the client's timeout",
            )

    return check


def _copies_done(inst: Instance, stream: Any, op: str, tokens: int, began: float) -> None:
    """Wait for the call's copies on ``stream`` (CUDA pools); DEBUG-log where the call's time went."""
    enqueued = time.perf_counter()
    if stream is not None:
        stream.synchronize()
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s of %d tokens for instance %d: %.2f ms to enqueue, %.2f ms more until copied",
            op,
            tokens,
            inst.instance_id,
            (enqueued - began) * 1e3,
            (time.perf_counter() - enqueued) * 1e3,
        )
