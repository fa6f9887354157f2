"""The server's service layer called directly: no sockets, no threads."""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec
import pytest
from support.server_process import CHUNK, MODEL, TPB, shared_pool

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.failures import ServiceFailure
from lmcache.server.instances import client_key
from lmcache.server.pool_sharing import describe_pool
from lmcache.server.security import Peer
from lmcache.server.service import CacheService
from lmcache.server.settings import ServerConfig

ME = Peer(os.geteuid(), os.getegid(), os.getpid())


@pytest.fixture
def service() -> Iterator[CacheService]:
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05), pinned=False
    )
    svc = CacheService(engine, ServerConfig(port=0, ipc_path=None, client_timeout_s=5.0, pin_ttl_s=60.0))
    yield svc
    svc.close()


def _register(service: CacheService, seed: int, iid: int) -> P.RegisterInfo:
    pool = shared_pool(seed=seed)
    req = P.Register(
        instance_id=iid,
        rank=0,
        world_size=1,
        model_name=MODEL,
        tokens_per_block=TPB,
        pool=describe_pool(pool),
    )
    info = service.handle(req, Call(ME))
    assert isinstance(info, P.RegisterInfo)
    return info


def test_store_lookup_pin_release_through_the_handler_table(service: CacheService) -> None:
    cap = _register(service, seed=1, iid=7).cap
    tokens = P.tokens_to_bytes(list(range(64)))
    stored = service.handle(
        P.Store(instance_id=7, cap=cap, tokens=tokens, block_ids=list(range(8)), end=64), Call(ME)
    )
    assert stored == 64
    assert service.handle(P.Lookup(instance_id=7, cap=cap, tokens=tokens, pin_id="p"), Call(ME)) == 64
    record = service.pins.get((7, "p"))
    assert record is not None and record.nbytes > 0
    assert service.stats().pinned_lookups == 1
    assert service.handle(P.Release(instance_id=7, cap=cap, pin_id="p"), Call(ME)) is True
    assert service.pins.get((7, "p")) is None and service.engine.pinned_ids() == []


def test_retrieve_releases_its_pins_after_the_reply(service: CacheService) -> None:
    cap = _register(service, seed=2, iid=8).cap
    tokens = P.tokens_to_bytes(list(range(100, 164)))
    service.handle(P.Store(instance_id=8, cap=cap, tokens=tokens, block_ids=list(range(8)), end=64), Call(ME))
    assert service.handle(P.Lookup(instance_id=8, cap=cap, tokens=tokens, pin_id=1), Call(ME)) == 64
    call = Call(ME, cleanups=[])
    req = P.Retrieve(instance_id=8, cap=cap, tokens=tokens, block_ids=list(range(8, 16)), end=64, pin_id=1)
    assert service.handle(req, call) == 64
    assert len(call.cleanups or []) == 1 and service.engine.pinned_ids() == [(8, 1)]  # until the reply is out
    for cleanup in call.cleanups or []:
        cleanup()
    assert service.engine.pinned_ids() == [] and len(service.pins) == 0


def test_unknown_or_forged_instances_fail_with_a_code(service: CacheService) -> None:
    _register(service, seed=3, iid=9)
    with pytest.raises(ServiceFailure) as failure:
        service.handle(P.Lookup(instance_id=9, cap=b"\0" * 32, tokens=b""), Call(ME))
    assert failure.value.code is P.ErrorCode.UNKNOWN_INSTANCE
    assert service.counters.refusals["capability"] == 1


def test_reap_retires_silent_instances_and_closes_their_extensions(service: CacheService) -> None:
    _register(service, seed=4, iid=10)
    inst = service.instances.get(10)
    assert inst is not None
    closed: list[int] = []

    class Tickets:
        def close(self) -> None:
            closed.append(10)

    inst.extensions["tickets"] = Tickets()
    service.reap(now=inst.last_seen + 1.0)
    assert 10 in service.instances
    service.reap(now=inst.last_seen + 10.0)
    assert 10 not in service.instances and inst.pool.closed and closed == [10]
    assert service.stats().reaped_instances == 1


def test_a_new_handler_group_plugs_in_but_cannot_take_a_served_type(service: CacheService) -> None:
    class Echo:
        pass

    service.add_handlers({Echo: lambda req, call: call.peer.pid})
    assert service.handle(Echo(), Call(ME)) == os.getpid()
    with pytest.raises(ValueError, match="already handled"):
        service.add_handlers({P.Ping: lambda req, call: None})


def test_ping_and_heartbeat(service: CacheService) -> None:
    cap = _register(service, seed=5, iid=11).cap
    assert service.handle(P.Ping(), Call(ME)).server_id == service.server_id
    beat = service.handle(P.Heartbeat(instance_ids=[11, 12], caps=[cap]), Call(ME))
    assert beat.unknown == [12]


def test_a_heartbeat_reports_the_misses_its_client_found_alone(service: CacheService) -> None:
    """Misses a client read from the presence counts count as the server's lookups, for its hit rate;
    only a client with a live registration may report them."""
    cap = _register(service, seed=7, iid=14).cap
    before = service.engine.snapshot().counters
    service.handle(P.Heartbeat(instance_ids=[15], missed_lookups=9, missed_tokens=9000), Call(ME))
    assert service.engine.snapshot().counters == before  # no live instance: not counted
    service.handle(P.Heartbeat(instance_ids=[14], caps=[cap], missed_lookups=3, missed_tokens=3072), Call(ME))
    after = service.engine.snapshot().counters
    assert (after.lookups, after.lookup_tokens) == (before.lookups + 3, before.lookup_tokens + 3072)
    assert after.hit_tokens == before.hit_tokens
    negative = {"v": P.PROTOCOL_VERSION, "rid": 1, "op": "heartbeat", "missed_lookups": -1}
    with pytest.raises(P.ProtocolError, match="missed_lookups"):
        P.decode_request(msgspec.msgpack.encode(negative))


def test_transfer_errors_name_what_was_wrong(service: CacheService) -> None:
    cap = _register(service, seed=6, iid=13).cap
    tokens = P.tokens_to_bytes(list(range(64)))
    with pytest.raises(ServiceFailure, match=r"block ids must be in \[0, 64\)"):
        service.handle(P.Store(instance_id=13, cap=cap, tokens=tokens, block_ids=[99] * 8, end=64), Call(ME))
    with pytest.raises(ServiceFailure, match="not within the request's 64 tokens"):
        service.handle(
            P.Store(instance_id=13, cap=cap, tokens=tokens, block_ids=list(range(8)), end=65), Call(ME)
        )


class _RecordingStream:
    """Stands in for a CUDA stream: records what synchronized it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def synchronize(self) -> None:
        self.log.append(f"sync {self.name}")


def test_an_exported_pools_saves_and_loads_run_on_streams_of_their_own(
    service: CacheService, monkeypatch
) -> None:
    """A save copies on the instance's store stream and waits for that one only, a load on its load
    stream: a load beside a save in flight does not wait for it (D57)."""
    from lmcache.chunk_copy import CopyStreams

    cap = _register(service, seed=3, iid=9).cap
    log: list[str] = []
    inst = service.instances.get(9)
    assert inst is not None
    inst.streams = CopyStreams(_RecordingStream("store", log), _RecordingStream("load", log))
    engine = service.engine
    for op in ("store", "retrieve"):
        real = getattr(engine, op)

        def spy(space, rank, pool, transfer, stream, _real=real, _op=op, **kwargs):  # type: ignore[no-untyped-def]
            log.append(f"{_op} on {stream.name}")
            return _real(space, rank, pool, transfer, None, **kwargs)

        monkeypatch.setattr(engine, op, spy)
    tokens = P.tokens_to_bytes(list(range(100, 164)))
    store = P.Store(instance_id=9, cap=cap, tokens=tokens, block_ids=list(range(8)), end=64)
    assert service.handle(store, Call(ME)) == 64
    load = P.Retrieve(instance_id=9, cap=cap, tokens=tokens, block_ids=list(range(8, 16)), end=64)
    assert service.handle(load, Call(ME)) == 64
    assert log == ["store on store", "sync store", "retrieve on load", "sync load"]


def test_a_client_pinning_through_many_instances_leaves_half_of_l1_to_stores() -> None:
    """Four instances of one client, each within ``--pin-share``, cannot pin more than half of L1
    together; a store then still finds room."""
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.0005), pinned=False
    )
    service = CacheService(engine, ServerConfig(port=0, ipc_path=None, client_timeout_s=5.0))
    try:
        caps = {iid: _register(service, seed=iid, iid=iid).cap for iid in range(1, 6)}

        def tokens(prompt: int) -> bytes:
            return P.tokens_to_bytes(list(range(prompt * 10_000, prompt * 10_000 + 512)))

        def store(iid: int, prompt: int) -> int:
            blocks = list(range(64))
            return service.handle(
                P.Store(instance_id=iid, cap=caps[iid], tokens=tokens(prompt), block_ids=blocks, end=512),
                Call(ME),
            )

        for prompt in range(4):  # together about all of L1
            store(1, prompt)
        refusals = []
        for prompt in range(4):  # each instance pins what one store put there: a quarter of L1
            lookup = P.Lookup(instance_id=prompt + 1, cap=caps[prompt + 1], tokens=tokens(prompt), pin_id="p")
            try:
                service.handle(lookup, Call(ME))
            except ServiceFailure as e:
                refusals.append((e.code, str(e)))
        assert len(refusals) == 2
        assert all(
            code == P.ErrorCode.LIMIT and "client's share of L1" in message for code, message in refusals
        )
        assert service.pins.table.client_held(client_key(ME)) <= engine.l1.arena.capacity_bytes // 2
        assert store(5, 9) == 512
    finally:
        service.close()
