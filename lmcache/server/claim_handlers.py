"""The claim index (:mod:`lmcache.server.claims`) plugged into a
:class:`~lmcache.server.service.CacheService`.

* ``register``: the reply names the index and the instance's claim table;
* ``lookup_hashes`` with ``claims`` (sent one-way by a client that claimed its hit): pinned as any
  lookup, then the instance's claims of those entries are given back, once its capability is
  checked (nobody else can give them back);
* an instance retired or reaped: its claims no longer hold anything;
* ``store_reserve``: the chunks of the store are marked as being stored until published, so a save
  TRT-LLM learns has landed is seen by every later lookup, claimed or not;
* every reaping round: a claim table holding more than ``--pin-share`` of L1 stops being honoured,
  and the marks of stores never published go.
"""

from __future__ import annotations

import time
from typing import Any

from lmcache.server import protocol as P
from lmcache.server.calls import Call, Handler
from lmcache.server.claims import ClaimIndex
from lmcache.server.instances import Instance
from lmcache.server.prompts import request_prompt
from lmcache.server.service import CacheService

__all__ = ["ClaimHandlers"]


class ClaimHandlers:
    """Wraps ``register``, ``lookup_hashes`` and ``store_reserve`` of ``service`` (see the module)."""

    def __init__(self, service: CacheService, index: ClaimIndex) -> None:
        self.service = service
        self.index = index
        self._register: Handler = service.handlers[P.Register]
        self._lookup: Handler = service.handlers[P.LookupHashes]
        self._store_reserve: Handler | None = service.handlers.get(P.StoreReserve)
        """Served only with the shared-L1 ops."""

    @classmethod
    def install(cls, service: CacheService, index: ClaimIndex) -> ClaimHandlers:
        handlers = cls(service, index)
        wrapped: dict[type, Handler] = {P.Register: handlers.register, P.LookupHashes: handlers.lookup}
        if P.StoreReserve in service.handlers:  # the shared-L1 ops are served
            wrapped[P.StoreReserve] = handlers.store_reserve
        service.handlers.update(wrapped)
        service.instances.on_retire.append(handlers.forget)
        return handlers

    def register(self, req: P.Register, call: Call) -> P.RegisterInfo:
        info: P.RegisterInfo = self._register(req, call)
        inst = self.service.instances.get(info.instance_id)
        if inst is not None:
            regions = self.index.regions(inst.registration)
            regions.share_bytes, regions.chunk_bytes = self._share_bytes(), self._chunk_bytes(inst)
            info.claims = regions
        return info

    def lookup(self, req: P.LookupHashes, call: Call) -> Any:
        if not req.claims:
            return self._lookup(req, call)
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            try:
                return self._lookup(req, call)
            finally:  # pinned (or failed): the claims have done their part either way
                self.index.release(inst.registration, req.claims)

    def store_reserve(self, req: P.StoreReserve, call: Call) -> P.StoreSlots:
        """Reserve as usual, then mark the store's chunks (its leased ones first) as being stored (see
        :meth:`ClaimIndex.storing`) before the reply lets the worker copy and report them done."""
        assert self._store_reserve is not None
        reply: P.StoreSlots = self._store_reserve(req, call)
        self._mark_storing(req)
        return reply

    def _mark_storing(self, req: P.StoreReserve) -> None:
        inst = self.service.instances.get(req.instance_id)
        if inst is None:  # gone meanwhile: its store is never reported
            return
        engine = self.service.engine
        size = engine.config.chunk_size
        first = max(0, req.start - len(req.filling) * size)
        digest_size = engine.hasher(inst.space).digest_size
        if req.chunk_hashes is not None:  # the digests the worker sent: full chunks, in order
            digests = req.chunk_hashes[first // size * digest_size : req.end // size * digest_size]
        else:
            prompt = request_prompt(engine, inst.space, req)
            spans = engine.iter_chunk_spans(inst.space, inst.rank, prompt, req.cache_salt, req.end)
            digests = b"".join(span.key.chunk_hash for span in spans if span.start >= first)
        self.index.storing(  # charged to the client: its instances share one budget of marks
            inst.client, digests, digest_size, inst.space.world_size, inst.rank, time.monotonic()
        )

    def forget(self, inst: Instance) -> None:
        self.index.forget(inst.registration)

    def check_shares(self) -> None:
        """Stop honouring claim tables over the instances' share of L1, drop the marks of stores never
        published (see the module)."""
        instances = self.service.instances.snapshot()
        chunk_bytes = {inst.registration: self._chunk_bytes(inst) for inst in instances}
        instance_ids = {inst.registration: inst.instance_id for inst in instances}
        self.index.check_shares(chunk_bytes, self._share_bytes(), instance_ids)
        self.index.expire(time.monotonic())

    def _chunk_bytes(self, inst: Instance) -> int:
        return inst.chunk_bytes(self.service.engine.config.chunk_size)

    def _share_bytes(self) -> int:
        """What one instance's pinned lookups may hold in L1 (``--pin-share``)."""
        return int(self.service.config.pin_share * self.service.engine.l1.arena.capacity_bytes)
