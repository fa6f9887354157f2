"""What a request costs the cache server's I/O thread if it runs there (:meth:`Dispatcher.inline
<lmcache.server.dispatch.Dispatcher.inline>`), known before it runs, from its fields and a few
counts the server holds.

A request runs inline only when its cost is at most :data:`INLINE_MAX_COST`, counted in tokens
hashed; each chunk's fixed work counts as :data:`CHUNK_COST` tokens. What each op does there:

* ``lookup``: converts its token ids (a list: one per id; bytes: free), hashes them all (the chain
  runs over the whole prompt) and probes each chunk's key for every rank of the instance's world;
  with ``slots``, names each pinned chunk's slot; with ``save_unfull_chunk``, hashes and probes
  up to ``chunk_size / tokens_per_block`` partial chunks at the hit's end.
* ``lookup_hashes``: splits and checks every digest sent (however many ``num_tokens`` says), then
  as ``lookup``, without hashing; gives back each claim entry (4 bytes each, one token's worth).
* shared-L1 ``load``: the chain from the prompt's start to the end of the chunk holding ``end``
  (not ``end - start``), or every digest sent split and checked; then pins and names each chunk of
  ``[start, end)``.
* ``store_done``: publishes or frees each slot of its ticket and each lease named (and queues
  each published chunk for every lower tier); with leases, hashes the prompt up to ``end``.
* ``load_done``: unpins each chunk of its ticket (in L1 and in the lower tiers); ``release``:
  unpins each key the lookup pinned.
* A request naming a lookup's pins (``pin_id``) first releases those of the same id.

Lookups and loads never run inline when there are lower tiers (a miss in L1 may read from disk or
the network). The per-connection order does not depend on where a request runs (see
:meth:`Dispatcher.on_frames <lmcache.server.dispatch.Dispatcher.on_frames>`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmcache.keys import HASH_ALGORITHMS
from lmcache.server import protocol as P
from lmcache.server.service import CacheService

__all__ = ["CHUNK_COST", "INLINE_MAX_COST", "InlineCosts"]

INLINE_MAX_COST = 1 << 17
"""Most work the I/O thread does for one request itself, in tokens hashed: a lookup of 64k token
ids of one rank (their hashing, and the probes of their 256-token chunks) fits."""
CHUNK_COST = 64
"""One chunk's fixed work (a link of the hash chain, a key built and probed, pinned, unpinned or
published, a digest split and checked, a slot named), counted as this many tokens hashed."""
CLAIM_BYTES = 4
"""Bytes of one claim entry of ``lookup_hashes``."""


class InlineCosts:
    """The I/O thread's cost of each request of ``service`` (see the module)."""

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.engine = service.engine
        config = service.engine.config
        self.chunk_size = config.chunk_size
        self.save_unfull_chunk = config.save_unfull_chunk
        self.digest_size = len(HASH_ALGORITHMS[config.pre_caching_hash_algorithm](b"").digest())
        self._costs: dict[type, Callable[[Any], int | None]] = {
            P.Lookup: self._lookup,
            P.LookupHashes: self._lookup_hashes,
            P.Load: self._load,
            P.StoreDone: self._store_done,
            P.LoadDone: lambda req: CHUNK_COST * self._ticket_chunks(req.instance_id, req.ticket),
            P.Release: lambda req: self._pins(req.pin_owner, req.instance_id, req.pin_id),
        }

    def runs_inline(self, req: Any) -> bool:
        """Whether ``req`` costs at most :data:`INLINE_MAX_COST`."""
        cost = self.cost(req)
        return cost is not None and cost <= INLINE_MAX_COST

    def cost(self, req: Any) -> int | None:
        """``req``'s work on the I/O thread, in tokens hashed; None: it never runs there (an op of
        unbounded or unknown cost)."""
        cost_of = self._costs.get(type(req))
        return None if cost_of is None else cost_of(req)

    # ---- per op ---------------------------------------------------------------------------------

    def _lookup(self, req: P.Lookup) -> int | None:
        inst = self.service.instances.get(req.instance_id)
        if inst is None or self.engine.tiers is not None:  # unregistered: its world size is unknown
            return None
        num_tokens = P.wire_id_count(req.tokens)
        chunks = num_tokens // self.chunk_size
        cost = self._prompt(req.tokens, num_tokens) + CHUNK_COST * chunks * (inst.world_size + int(req.slots))
        if self.save_unfull_chunk:
            tpb = inst.space.layout.tokens_per_block
            cost += self.chunk_size // tpb * (self.chunk_size + CHUNK_COST * inst.world_size)
        return cost + self._pins(None, req.instance_id, req.pin_id)

    def _lookup_hashes(self, req: P.LookupHashes) -> int | None:
        inst = self.service.instances.get(req.instance_id)
        if inst is None or self.engine.tiers is not None:
            return None
        digests = len(req.chunk_hashes) // self.digest_size
        cost = CHUNK_COST * digests * (1 + inst.world_size + int(req.slots)) + len(req.claims) // CLAIM_BYTES
        return cost + self._pins(None, req.instance_id, req.pin_id)

    def _load(self, req: P.Load) -> int | None:
        if self.engine.tiers is not None:
            return None
        size = self.chunk_size
        chunk_end = -(-req.end // size) * size  # a load's last chunk is hashed whole
        cost, prompt_tokens = self._named_prompt(req, chunk_end)
        pinned = max(0, -(-min(chunk_end, prompt_tokens) // size) - req.start // size)
        return cost + CHUNK_COST * pinned + self._pins(req.pin_owner, req.instance_id, req.pin_id)

    def _store_done(self, req: P.StoreDone) -> int:
        tiers = self.engine.tiers
        per_slot = CHUNK_COST * (1 + (len(tiers.tiers) if tiers is not None else 0))
        cost = per_slot * (len(req.leases) + self._ticket_chunks(req.instance_id, req.ticket))
        if req.leases:  # the leased chunks are named by the prompt, hashed up to ``end``
            cost += self._named_prompt(req, req.end)[0]
        return cost

    # ---- parts ----------------------------------------------------------------------------------

    def _named_prompt(self, req: Any, end: int) -> tuple[int, int]:
        """The cost of a prompt named by ``tokens`` or ``chunk_hashes`` (every digest is split and
        checked) hashed up to ``end``, and its length in tokens."""
        if req.chunk_hashes is not None:
            digests = len(req.chunk_hashes) // self.digest_size
            return CHUNK_COST * digests, digests * self.chunk_size
        num_tokens = P.wire_id_count(req.tokens)
        cost = self._prompt(req.tokens, min(end, num_tokens))
        if self.save_unfull_chunk:  # a partial last chunk
            cost += self.chunk_size + CHUNK_COST
        return cost, num_tokens

    def _prompt(self, tokens: P.WireIds, hashed: int) -> int:
        """Converting ``tokens`` from the wire, then hashing the first ``hashed`` of them."""
        converted = len(tokens) if isinstance(tokens, list) else 0
        return converted + hashed + CHUNK_COST * (hashed // self.chunk_size)

    def _pins(self, owner: int | None, instance_id: int, pin_id: int | str | None) -> int:
        """Releasing the pins a lookup of ``pin_id`` holds (none without a ``pin_id``)."""
        if pin_id is None:
            return 0
        key = (instance_id if owner is None else owner, pin_id)
        return CHUNK_COST * self.engine.pinned_key_count(key)

    def _ticket_chunks(self, instance_id: int, ticket: int) -> int:
        """The chunks of the ticket of the instance registered now (a request of an earlier registration
        of its id is refused before it runs: counting the current one's is the worst case)."""
        shared = self.service.shared_l1
        inst = self.service.instances.get(instance_id) if shared is not None and ticket else None
        return 0 if inst is None or shared is None else shared.ticket_chunks(inst.registration, ticket)
