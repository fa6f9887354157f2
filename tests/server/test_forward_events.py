"""A store of an exported pool that names a worker's forward event (``after_event``): the server prepares
it, polls the event on the host, copies once it completed, and gives up at the request's deadline; on
CPU the worker's interprocess events are stood in for by objects answering ``query()``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import raw_lane
import torch
from in_process_server import start_serving, stop_serving
from support.server_process import CHUNK, MODEL, TPB, shared_pool, wait_until

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.metrics import EngineCollector
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.client import CacheServerClient
from lmcache.server.dispatch import Admission, Dispatcher
from lmcache.server.export_transfers import ExportTransfers
from lmcache.server.failures import ServiceFailure
from lmcache.server.forward_events import WorkerForward
from lmcache.server.pool_sharing import describe_pool
from lmcache.server.security import Peer
from lmcache.server.service import CacheService
from lmcache.server.settings import ServerConfig
from lmcache.transfer import BlockTransfer

ME = Peer(os.geteuid(), os.getegid(), os.getpid())
TOKENS = P.tokens_to_bytes(list(range(500, 564)))


class Forward:
    """Stands in for a worker's forward event: complete once :meth:`end` is called."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.ended.is_set()

    def end(self) -> None:
        self.ended.set()


@pytest.fixture
def service() -> Iterator[CacheService]:
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05), pinned=False
    )
    svc = CacheService(engine, ServerConfig(port=0, ipc_path=None, client_timeout_s=5.0))
    yield svc
    svc.close()


def _register(service: CacheService, forwards: list[Forward]) -> bytes:
    """Register an exported CPU pool whose server-side view holds ``forwards`` as its opened events."""
    pool = shared_pool(seed=5)
    req = P.Register(
        instance_id=3, rank=0, world_size=1, model_name=MODEL, tokens_per_block=TPB, pool=describe_pool(pool)
    )
    info = service.handle(req, Call(ME))
    inst = service.instances.get(3)
    assert inst is not None and info.forward_events == 0  # a CPU pool sends none
    inst.pool.forward_events = list(forwards)
    return info.cap


def _call(timeout_s: float) -> Call:
    call = Call(ME)
    call.set_timeout(time.monotonic(), int(timeout_s * 1000))
    return call


def _store(cap: bytes, after_event: int | None) -> P.Store:
    return P.Store(
        instance_id=3, cap=cap, tokens=TOKENS, block_ids=list(range(8)), end=64, after_event=after_event
    )


def _lookup(service: CacheService, cap: bytes) -> int:
    return service.handle(P.Lookup(instance_id=3, cap=cap, tokens=TOKENS), Call(ME))


def _forward_waits(service: CacheService) -> int:
    """What ``lmcache stats`` shows of the instance's waiting requests, and ``/metrics`` of all."""
    (instance,) = service.stats().instances
    metrics = EngineCollector(service.engine, service).collect()
    (gauge,) = [m for m in metrics if m.name == "lmcache_server_forward_waits"]
    assert gauge.samples[0].value == instance.forward_waits
    return instance.forward_waits


def _waiting(
    service: CacheService, req: P.Store | P.Retrieve, forward: Forward
) -> tuple[threading.Thread, list[int]]:
    """``req`` handled on a thread, once it polls ``forward`` (it has prepared and waits): the thread
    and where its result goes."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.handle(req, _call(20))))
    thread.start()
    deadline = time.monotonic() + 10
    while forward.queries < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert forward.queries >= 3 and not result
    assert _forward_waits(service) == 1  # what `lmcache stats` shows of the instance meanwhile
    return thread, result


def test_a_store_copies_once_the_workers_forward_ended(service: CacheService) -> None:
    forward = Forward()
    cap = _register(service, [forward])
    store, result = _waiting(service, _store(cap, 0), forward)
    assert _lookup(service, cap) == 0  # nothing published while the forward runs
    forward.end()
    store.join(10)
    assert result == [64]
    assert _lookup(service, cap) == 64
    assert _forward_waits(service) == 0


def _retrieve(cap: bytes, after_event: int | None) -> P.Retrieve:
    return P.Retrieve(
        instance_id=3, cap=cap, tokens=TOKENS, block_ids=list(range(8, 16)), end=64, after_event=after_event
    )


def test_a_load_copies_once_the_work_before_it_on_the_workers_stream_ended(service: CacheService) -> None:
    """A load into an exported pool names the event after its stream's earlier work (which may still
    use the blocks): it pins and prepares meanwhile, and writes no block before that event completed."""
    stream_work = Forward()
    cap = _register(service, [stream_work])
    assert service.handle(_store(cap, None), _call(5)) == 64
    pool = service.instances.get(3).pool.tensor
    pool[8:16].fill_(-1.0)  # what the stream's earlier work left in the blocks the load writes
    load, result = _waiting(service, _retrieve(cap, 0), stream_work)
    assert bool((pool[8:16] == -1.0).all()), "the load wrote a block before the stream's work ended"
    stream_work.end()
    load.join(10)
    assert result == [64]
    assert torch.equal(pool[8:16], pool[0:8])


def test_a_load_whose_stream_work_never_ends_expires_and_writes_nothing(service: CacheService) -> None:
    cap = _register(service, [Forward()])
    assert service.handle(_store(cap, None), _call(5)) == 64
    pool = service.instances.get(3).pool.tensor
    pool[8:16].fill_(-1.0)
    with pytest.raises(ServiceFailure, match="retrieve: the worker's forward did not end") as refused:
        service.handle(_retrieve(cap, 0), _call(0.3))
    assert refused.value.code is P.ErrorCode.EXPIRED
    assert bool((pool[8:16] == -1.0).all())
    assert service.engine.clear() == 2  # the load's pins went with it: both chunks may be dropped


def test_a_forward_that_never_ends_expires_the_store_and_copies_nothing(service: CacheService) -> None:
    cap = _register(service, [Forward()])  # a worker that died before its forward ended
    call = _call(0.3)
    with pytest.raises(ServiceFailure) as refused:
        service.handle(_store(cap, 0), call)
    assert refused.value.code is P.ErrorCode.EXPIRED and "forward did not end" in str(refused.value)
    assert call.expiring()  # it gave up at the request's deadline, not at the server's own bound
    assert _lookup(service, cap) == 0
    assert service.instances.get(3).pool.awaited == set()  # the event may be named again
    ended = Forward()
    ended.end()
    service.instances.get(3).pool.forward_events = [ended]
    assert service.handle(_store(cap, 0), _call(5)) == 64  # the server serves the instance on


def test_an_event_the_server_did_not_open_or_a_store_without_timeout_is_refused(
    service: CacheService,
) -> None:
    forward = Forward()
    forward.end()
    cap = _register(service, [forward])
    with pytest.raises(ServiceFailure, match="after_event 1 names none of the 1 forward events") as refused:
        service.handle(_store(cap, 1), _call(5))
    assert refused.value.code is P.ErrorCode.INVALID
    with pytest.raises(ServiceFailure, match="without timeout_ms"):
        service.handle(_store(cap, 0), Call(ME))
    with pytest.raises(msgspec.ValidationError):  # at most MAX_FORWARD_EVENTS: indices below it
        msgspec.convert(
            {"instance_id": 3, "tokens": b"", "block_ids": [], "end": 0, "after_event": 4}, P.Store
        )
    assert _lookup(service, cap) == 0


def test_one_request_at_a_time_waits_for_an_event() -> None:
    awaited: set[int] = set()
    first = WorkerForward(Forward(), lambda: False, awaited, 2, "store")
    with first:
        assert awaited == {2}
        with (
            pytest.raises(ServiceFailure) as refused,
            WorkerForward(Forward(), lambda: False, awaited, 2, "store"),
        ):
            pass
        assert refused.value.code is P.ErrorCode.LIMIT
        with WorkerForward(Forward(), lambda: False, awaited, 1, "store"):
            assert awaited == {1, 2}
    assert awaited == set()


def test_a_descriptor_carries_at_most_the_events_the_protocol_allows() -> None:
    fields = {"shape": [4, 2, 2, 8], "dtype": "float16", "ipc_handle": b"h" * 64, "alloc_bytes": 1024}
    fields["device_uuid"] = "0" * 32
    assert msgspec.convert({**fields, "forward_events": [b"e" * 64] * 4}, P.CudaIpcPool).forward_events
    for events in ([b"e" * 64] * 5, [b"e" * 63]):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({**fields, "forward_events": events}, P.CudaIpcPool)


def test_a_store_that_waits_for_a_forward_runs_beside_the_workers_that_serve_lookups(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Such a store may wait a whole forward: it runs on threads of its own, not the ones that serve
    lookups and loads."""
    threads: list[str] = []
    store = ExportTransfers.store

    def recorded(self: ExportTransfers, req: P.Store, call: Call) -> int:
        threads.append(threading.current_thread().name)
        return store(self, req, call)

    monkeypatch.setattr(ExportTransfers, "store", recorded)
    ipc = tmp_path / "s.sock"
    server, thread = start_serving("export", ipc_path=str(ipc))
    client = CacheServerClient(f"ipc://{ipc}", timeout_s=20.0)
    try:
        info = client.register(shared_pool(seed=6), 0, 1, MODEL, TPB, pool_sharing="export")
        assert client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)) == 64
        sock = raw_lane.connect(f"ipc://{ipc}")
        req = P.Store(
            instance_id=info.instance_id, cap=info.cap, tokens=TOKENS, block_ids=list(range(8)), end=64
        )
        req.after_event, req.timeout_ms, req.rid = 0, 5000, 9
        sock.sendall(raw_lane.framed(P.encode(req)))
        reply = raw_lane.read_reply(sock)
        assert reply.error is not None and "names none of the 0 forward events" in reply.error.message
        sock.close()
    finally:
        client.close()
        stop_serving(server, thread)
    assert threads[0].startswith("lmcache-worker") and threads[1].startswith("lmcache-forward")


@pytest.mark.parametrize("op", ["store", "retrieve"])
def test_a_request_waiting_for_a_forward_is_given_up_once_its_connection_closes(op: str, tmp_path) -> None:
    """A worker that dies mid-forward closes its connections: its waiting request ends then, with
    nothing copied (a load's pins released), long before its deadline."""
    ipc = tmp_path / "s.sock"
    server, thread = start_serving("export", ipc_path=str(ipc))
    client = CacheServerClient(f"ipc://{ipc}", timeout_s=20.0)
    try:
        info = client.register(shared_pool(seed=7), 0, 1, MODEL, TPB, pool_sharing="export")
        instance = server.service.instances.get(info.instance_id)
        assert instance is not None
        assert client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)) == 64
        forward = Forward()
        instance.pool.forward_events = [forward]
        fields = {
            "instance_id": info.instance_id,
            "cap": info.cap,
            "block_ids": list(range(8, 16)),
            "end": 64,
        }
        tokens = P.tokens_to_bytes(list(range(64)) if op == "retrieve" else list(range(100, 164)))
        req = (P.Retrieve if op == "retrieve" else P.Store)(tokens=tokens, **fields)
        req.after_event, req.timeout_ms, req.rid = 0, 600_000, 9
        sock = raw_lane.connect(f"ipc://{ipc}")
        sock.sendall(raw_lane.framed(P.encode(req)))
        wait_until(lambda: forward.queries >= 3, "the request polling the forward")
        errors = client.stats().errors
        sock.close()
        wait_until(lambda: client.stats().errors == errors + 1, "the request given up", limit_s=10)
        assert client.stats().instances[0].forward_waits == 0
        assert forward.queries > 0 and not forward.ended.is_set()
        assert client.lookup(list(range(100, 164))) == 0  # no store published
        assert client.clear() == 2  # no load's pins left behind
    finally:
        client.close()
        stop_serving(server, thread)


class _ThreadsRecorded:
    """Replaces a service's ``handle``: records which thread runs each request; a store naming a
    forward waits until ``forward_ended`` is set, as one whose event never completes would, and any
    other until ``queued`` is (the requests behind it are in its connection's queue by then)."""

    def __init__(self) -> None:
        self.threads: dict[int, str] = {}
        self.forward_ended = threading.Event()
        self.queued = threading.Event()

    def handle(self, req: P.Store, call: Call) -> int:
        self.threads[req.rid] = threading.current_thread().name
        (self.queued if req.after_event is None else self.forward_ended).wait(20)
        return 0


class _Replies:
    def __init__(self) -> None:
        self.rids: set[int] = set()
        self.arrived = threading.Condition()

    def post(self, identity: int, reply: P.Reply) -> None:
        with self.arrived:
            self.rids.add(reply.rid)
            self.arrived.notify_all()

    def wait_for(self, rids: set[int], timeout: float = 20) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: rids <= self.rids, timeout)


def test_a_store_waiting_for_a_forward_behind_another_request_still_leaves_the_general_workers(
    service: CacheService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's store that waits for a forward, queued behind a request of the same connection,
    moves to the forward threads when its turn comes: with every general worker's connection doing
    so, another client's request is still served (the waits would hold every general worker before)."""
    config = ServerConfig(port=0, ipc_path=None, client_timeout_s=0, max_workers=2)
    recorded = _ThreadsRecorded()
    monkeypatch.setattr(service, "handle", recorded.handle)
    dispatcher = Dispatcher(service, config, Admission(config), threading.Event())
    replies = _Replies()
    dispatcher.bind(replies)

    def store(rid: int, after_event: int | None) -> bytes:
        req = P.Store(rid=rid, instance_id=1, tokens=b"", block_ids=b"", end=0, timeout_ms=60_000)
        req.after_event = after_event
        return P.encode(req)

    try:
        dispatcher.on_frames(
            [(conn, store(10 * conn + 1, None), ME) for conn in (1, 2)]
            + [(conn, store(10 * conn + 2, 0), ME) for conn in (1, 2)]
        )
        recorded.queued.set()
        assert replies.wait_for({11, 21})
        dispatcher.on_frames([(3, store(31, None), ME)])
        assert replies.wait_for({31}, 5), "another client's store waited behind forward waits"
    finally:
        recorded.forward_ended.set()
        dispatcher.shutdown()
    assert replies.wait_for({12, 22})
    assert recorded.threads[12].startswith("lmcache-forward-Store")
    assert recorded.threads[22].startswith("lmcache-forward-Store")
    assert recorded.threads[31].startswith("lmcache-worker")
