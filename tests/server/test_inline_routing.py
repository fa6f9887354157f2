"""Which requests the cache server's I/O thread runs itself (:meth:`Dispatcher.inline`): those whose
real cost (:mod:`lmcache.server.inline_cost`) fits the budget, whatever range or length the request
claims. The routing decision alone, on a service without sockets: no request runs, nothing is timed."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.server_process import CHUNK, MODEL, POOL_SHAPE, TPB

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server import inline_cost
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.dispatch import Admission, Dispatcher
from lmcache.server.inline_cost import CHUNK_COST
from lmcache.server.security import Peer
from lmcache.server.service import CacheService
from lmcache.server.settings import ServerConfig
from lmcache.server.shared_l1 import SharedL1Service
from lmcache.server.shared_l1_handlers import SharedL1Handlers
from lmcache.shm_slabs import ShmSlabSource

ME = Peer(os.geteuid(), os.getegid(), os.getpid())
LONG = 1 << 20
"""Tokens of a long prompt (a quarter of the most a request may carry)."""


@dataclass
class Routing:
    service: CacheService
    dispatcher: Dispatcher

    def register(self, instance_id: int, world_size: int = 1) -> bytes:
        """Rank 0 of a shared-L1 pool; its capability."""
        pool = P.SharedL1Pool(shape=list(POOL_SHAPE), dtype="float32", pid=os.getpid())
        req = P.Register(
            instance_id=instance_id,
            rank=0,
            world_size=world_size,
            model_name=MODEL,
            tokens_per_block=TPB,
            pool=pool,
        )
        info = self.service.handle(req, Call(ME))
        assert isinstance(info, P.RegisterInfo)
        return info.cap

    def handle(self, req: Any) -> Any:
        return self.service.handle(req, Call(ME))

    def inline(self, req: Any) -> bool:
        return self.dispatcher.inline(req)


@pytest.fixture
def routing(tmp_path: Path) -> Iterator[Routing]:
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    engine = CacheEngine(config, pinned=False, slab_source=ShmSlabSource(shm_dir=str(tmp_path)))
    server_config = ServerConfig(port=0, ipc_path=None, client_timeout_s=0)
    service = CacheService(engine, server_config)
    SharedL1Handlers.install(service, SharedL1Service(engine))
    dispatcher = Dispatcher(service, server_config, Admission(server_config), threading.Event())
    yield Routing(service, dispatcher)
    dispatcher.shutdown()
    service.close()
    engine.l1.arena.close()


def _ids(count: int, base: int = 0) -> bytes:
    return np.arange(base, base + count, dtype="<i8").tobytes()


def _budget(monkeypatch: pytest.MonkeyPatch, cost: int) -> None:
    monkeypatch.setattr(inline_cost, "INLINE_MAX_COST", cost)


# ---- the default budget: what the request's fields used to hide ----------------------------------


def test_a_load_costs_the_chain_up_to_its_end_not_its_range(routing: Routing) -> None:
    cap = routing.register(7)
    tokens = _ids(LONG)
    assert routing.inline(P.Load(instance_id=7, cap=cap, tokens=tokens, start=0, end=CHUNK))
    # One chunk to load, but the chain runs over the million tokens before it.
    assert not routing.inline(P.Load(instance_id=7, cap=cap, tokens=tokens, start=LONG - CHUNK, end=LONG))
    # Named by digests instead: every digest sent is split and checked, whatever the range.
    digests = bytes(32 * (LONG // CHUNK))
    assert not routing.inline(P.Load(instance_id=7, cap=cap, tokens=b"", chunk_hashes=digests, end=CHUNK))


def test_a_lookup_costs_its_chunks_for_every_rank(routing: Routing) -> None:
    one, eight = routing.register(7), routing.register(8, world_size=8)
    tokens = _ids(1 << 14)
    assert routing.inline(P.Lookup(instance_id=7, cap=one, tokens=tokens))
    assert not routing.inline(P.Lookup(instance_id=8, cap=eight, tokens=tokens))
    assert not routing.inline(P.Lookup(instance_id=7, cap=one, tokens=list(range(1 << 16))))


def test_lookup_hashes_cost_every_digest_and_claim_sent_not_num_tokens(routing: Routing) -> None:
    cap = routing.register(7)
    one = bytes(32)
    assert routing.inline(P.LookupHashes(instance_id=7, cap=cap, chunk_hashes=one, num_tokens=CHUNK))
    many = bytes(32 * (LONG // CHUNK))
    assert not routing.inline(P.LookupHashes(instance_id=7, cap=cap, chunk_hashes=many, num_tokens=CHUNK))
    claims = bytes(4 * LONG)
    req = P.LookupHashes(instance_id=7, cap=cap, chunk_hashes=one, num_tokens=CHUNK, claims=claims)
    assert not routing.inline(req)


def test_a_store_done_costs_the_chain_up_to_its_leased_chunks(routing: Routing) -> None:
    cap = routing.register(7)
    tokens = _ids(LONG)
    # What a worker sends: the first chunks of a long prompt leased, the whole prompt named.
    assert routing.inline(
        P.StoreDone(instance_id=7, cap=cap, leases=[1, 2], tokens=tokens, start=0, end=2 * CHUNK)
    )
    assert not routing.inline(
        P.StoreDone(instance_id=7, cap=cap, leases=[1], tokens=tokens, start=LONG - CHUNK, end=LONG)
    )
    half = 1 << 19  # as a list: every id converted, then hashed up to the lease
    assert not routing.inline(
        P.StoreDone(
            instance_id=7, cap=cap, leases=[1], tokens=list(range(half)), start=half - CHUNK, end=half
        )
    )
    # Without leases the prompt is never read.
    assert routing.inline(P.StoreDone(instance_id=7, cap=cap, tokens=tokens))


def test_stats_always_and_lookups_of_unknown_instances_never_run_inline(routing: Routing) -> None:
    assert routing.inline(P.Stats())
    assert not routing.inline(P.Lookup(instance_id=99, tokens=_ids(CHUNK)))


# ---- at and beyond the bound ---------------------------------------------------------------------


def test_a_lookup_at_the_budget_runs_inline_and_one_token_more_does_not(
    routing: Routing, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = routing.register(8, world_size=2)
    # 4 chunks' tokens hashed, 4 links of the chain, 4 keys probed for each of the 2 ranks.
    _budget(monkeypatch, 4 * CHUNK + CHUNK_COST * 4 * (1 + 2))
    assert routing.inline(P.Lookup(instance_id=8, cap=cap, tokens=_ids(4 * CHUNK)))
    assert not routing.inline(P.Lookup(instance_id=8, cap=cap, tokens=_ids(4 * CHUNK + 1)))
    # The same ids as a list are converted first.
    assert not routing.inline(P.Lookup(instance_id=8, cap=cap, tokens=list(range(4 * CHUNK))))


def test_a_load_at_the_budget_runs_inline_and_the_same_range_one_chunk_later_does_not(
    routing: Routing, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = routing.register(7)
    # 8 chunks hashed (8 links), one chunk pinned.
    _budget(monkeypatch, 8 * CHUNK + CHUNK_COST * (8 + 1))
    tokens = _ids(9 * CHUNK)
    assert routing.inline(P.Load(instance_id=7, cap=cap, tokens=tokens, start=7 * CHUNK, end=8 * CHUNK))
    assert not routing.inline(P.Load(instance_id=7, cap=cap, tokens=tokens, start=8 * CHUNK, end=9 * CHUNK))


def test_store_done_and_load_done_cost_their_tickets_chunks(
    routing: Routing, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = routing.register(7)
    tokens = _ids(8 * CHUNK)
    reserved = routing.handle(P.StoreReserve(instance_id=7, cap=cap, tokens=tokens, end=8 * CHUNK))
    assert len(reserved.chunks) == 8
    done = P.StoreDone(instance_id=7, cap=cap, ticket=reserved.ticket)
    _budget(monkeypatch, 8 * CHUNK_COST)
    assert routing.inline(done)
    _budget(monkeypatch, 8 * CHUNK_COST - 1)
    assert not routing.inline(done)
    assert routing.handle(done) == 8 * CHUNK
    _budget(monkeypatch, 8 * CHUNK_COST)

    loading = routing.handle(P.Load(instance_id=7, cap=cap, tokens=tokens, end=8 * CHUNK))
    assert len(loading.chunks) == 8
    load_done = P.LoadDone(instance_id=7, cap=cap, ticket=loading.ticket)
    assert routing.inline(load_done)
    _budget(monkeypatch, 8 * CHUNK_COST - 1)
    assert not routing.inline(load_done)


def test_a_release_costs_the_keys_its_lookup_pinned(
    routing: Routing, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = routing.register(7)
    tokens = _ids(8 * CHUNK)
    reserved = routing.handle(P.StoreReserve(instance_id=7, cap=cap, tokens=tokens, end=8 * CHUNK))
    routing.handle(P.StoreDone(instance_id=7, cap=cap, ticket=reserved.ticket))
    assert routing.handle(P.Lookup(instance_id=7, cap=cap, tokens=tokens, pin_id="p")) == 8 * CHUNK
    release = P.Release(instance_id=7, cap=cap, pin_id="p")
    _budget(monkeypatch, 8 * CHUNK_COST)
    assert routing.inline(release)
    _budget(monkeypatch, 8 * CHUNK_COST - 1)
    assert not routing.inline(release)
    # A new lookup with the same pin id releases those pins first.
    assert not routing.inline(P.Lookup(instance_id=7, cap=cap, tokens=_ids(CHUNK, base=5000), pin_id="p"))
