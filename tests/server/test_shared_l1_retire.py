"""Shared-L1 requests that race their instance's retirement (reaped, unregistered on another lane),
reports that name leases wrongly, and instances of another pool-sharing mode: nothing they take may
outlive the instance, and nothing they name wrongly is published."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from in_process_server import start_serving, stop_serving
from raw_lane import connect, framed, read_reply
from shared_l1_support import CHUNK, TOKENS, SharedL1Env, shared_l1_env
from support.server_process import TPB, shared_pool

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient
from lmcache.server.shared_l1 import BadTicket
from lmcache.transfer import BlockTransfer


@pytest.fixture
def env(tmp_path):
    env = shared_l1_env(tmp_path)
    yield env
    env.close()


def pinned(env: SharedL1Env) -> int:
    return env.engine.snapshot().l1.pinned_chunks


def test_leases_granted_while_the_instance_is_retired_go_with_it(env) -> None:
    """The retire hook runs (on another thread) between the lease's count and its slots: the slots
    granted after it belong to no instance unless the handler's second forget finds them."""
    service, engine = env.service, env.engine
    reserve_slot = engine.lease_slot
    calls = []

    def lease_slot(space, key):
        calls.append(key)
        if len(calls) == 1:
            service.forget(7)  # the instance is retired now
        return reserve_slot(space, key)

    engine.lease_slot = lease_slot
    reply = service.store_reserve(env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=0, lease=3))
    engine.lease_slot = reserve_slot
    assert len(reply.leased) == 3
    service.forget(7)  # what SharedL1Handlers does after a request of a retired instance
    assert service.leased(7) == 0
    assert engine.l1.used_bytes == 0, "leased slots held for an instance that is gone"
    # The lease budget is whole again: a new instance gets its full lease.
    again = service.store_reserve(env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=0, lease=3))
    assert len(again.leased) == 3


def test_a_split_load_whose_instance_is_retired_after_its_first_part_fails_and_leaves_no_pin(env) -> None:
    service = env.service
    reply = service.store_reserve(env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert service.store_done(env.scope, P.StoreDone(instance_id=7, ticket=reply.ticket)) == 4 * CHUNK
    parts = []

    def send_part(part: P.LoadSlots) -> None:
        parts.append(part)
        service.forget(7)  # retired while its first part goes out

    with pytest.raises(BadTicket, match="unregistered during this load"):
        service.load(env.scope, P.Load(instance_id=7, tokens=TOKENS, end=4 * CHUNK, first=1), send_part)
    service.forget(7)
    assert len(parts) == 1 and service.open_tickets(7) == 0
    assert pinned(env) == 0, "chunks pinned for a load of an instance that is gone"


def test_a_first_part_that_cannot_be_sent_leaves_no_ticket_and_no_pin(env) -> None:
    """The first part of a split load is refused on its way out (the client gave up): no one will
    send load_done for its ticket, so the load leaves nothing open."""
    service = env.service
    reply = service.store_reserve(env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert service.store_done(env.scope, P.StoreDone(instance_id=7, ticket=reply.ticket)) == 4 * CHUNK

    def send_part(part: P.LoadSlots) -> None:
        raise TimeoutError("the client gave up")

    with pytest.raises(TimeoutError):
        service.load(env.scope, P.Load(instance_id=7, tokens=TOKENS, end=4 * CHUNK, first=1), send_part)
    assert service.open_tickets(7) == 0 and pinned(env) == 0


def test_a_report_naming_a_lease_it_does_not_hold_publishes_nothing(env) -> None:
    """Leases stand for chunks by their place in the report: with one unknown, the others would be
    published as chunks they do not hold. The whole report is refused, its slots freed."""
    service, engine = env.service, env.engine
    leased = service.store_reserve(env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=0, lease=2))
    assert len(leased.leased) == 2
    reserved = service.store_reserve(
        env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, start=2 * CHUNK, end=3 * CHUNK)
    )
    report = P.StoreDone(
        instance_id=7,
        ticket=reserved.ticket,
        leases=[10**9, leased.leased[1].id],
        start=0,
        end=2 * CHUNK,
        tokens=TOKENS,
    )
    with pytest.raises(BadTicket, match="not held by instance 7"):
        service.store_done(env.scope, report)
    assert engine.lookup(env.scope.space, TOKENS) == 0, "a refused report published chunks"
    assert service.open_tickets(7) == 0 and service.leased(7) == 1  # the lease not named stays held
    repeated = P.StoreDone(
        instance_id=7, leases=[leased.leased[0].id] * 2, start=0, end=2 * CHUNK, tokens=TOKENS
    )
    with pytest.raises(BadTicket, match="named twice"):
        service.store_done(env.scope, repeated)
    assert engine.lookup(env.scope.space, TOKENS) == 0 and service.leased(7) == 0
    assert engine.l1.used_bytes == 0


def call(lane, req: P.Request) -> P.Reply:
    lane.sendall(framed(P.encode(req)))
    reply = read_reply(lane)
    while reply.more:
        reply = read_reply(lane)
    return reply


@pytest.mark.parametrize(
    "request_of",
    [
        lambda iid, cap: P.StoreReserve(instance_id=iid, tokens=b"", end=0, lease=4, cap=cap),
        lambda iid, cap: P.StoreDone(instance_id=iid, ticket=1, cap=cap),
        lambda iid, cap: P.Load(instance_id=iid, tokens=b"", end=0, cap=cap),
        lambda iid, cap: P.LoadDone(instance_id=iid, ticket=1, cap=cap),
    ],
)
def test_the_shared_l1_ops_refuse_an_instance_whose_pool_the_server_maps(tmp_path, request_of) -> None:
    """An exported pool's instance never writes L1 slots itself: were it served store_reserve and
    store_done, it could publish a slot unwritten, which still holds an evicted chunk's bytes."""
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("auto", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0)
    try:
        info = client.register(shared_pool(seed=1), 0, 1, "m", TPB, pool_sharing="export")
        lane = connect(f"ipc://{path}")
        reply = call(lane, request_of(info.instance_id, info.cap))
        lane.close()
        assert not reply.ok and reply.error.code == "invalid"
        assert "only instances registered in the shared-l1 mode" in reply.error.message
        assert "registered its pool as cpu-shm" in reply.error.message
        assert server.engine.snapshot().l1.chunks == 0 and server.engine.l1.used_bytes == 0
    finally:
        client.close()
        stop_serving(server, thread)


def test_a_late_request_of_an_earlier_registration_leaves_a_new_registration_of_its_id_alone(
    tmp_path, monkeypatch
) -> None:
    """A store_reserve of instance 7 is still running when 7 unregisters and registers again. The
    request then retires what it took; the new registration's lease, which a worker may be copying
    into, stays held (were it freed, another chunk could take the slot the worker is writing)."""
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("shared-l1", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0)
    engine, shared = server.engine, server.service.shared_l1
    assert shared is not None
    entered, go = threading.Event(), threading.Event()
    lease_slot = engine.lease_slot

    def slow_first_lease(space, key):
        if not entered.is_set():
            entered.set()
            assert go.wait(20)
        return lease_slot(space, key)

    monkeypatch.setattr(engine, "lease_slot", slow_first_lease)
    replies: list[P.Reply] = []
    try:
        pool = shared_pool(seed=2)
        old = client.register(pool, 0, 1, "m", TPB, pool_sharing="shared-l1", instance_id=7)
        stale_lane = connect(f"ipc://{path}")
        stale = threading.Thread(
            target=lambda: replies.append(
                call(stale_lane, P.StoreReserve(instance_id=7, tokens=b"", end=0, lease=1, cap=old.cap))
            )
        )
        stale.start()
        assert entered.wait(20)
        assert client.unregister(7)
        new = client.register(pool, 0, 1, "m", TPB, pool_sharing="shared-l1", instance_id=7)
        lane = connect(f"ipc://{path}")
        leased = call(lane, P.StoreReserve(instance_id=7, tokens=b"", end=0, lease=2, cap=new.cap))
        lane.close()
        granted = msgspec.convert(leased.value, P.StoreSlots).leased
        assert leased.ok and len(granted) == 2
        go.set()
        stale.join(20)
        stale_lane.close()
        registration = server.service.instances.get(7).registration
        assert replies and shared.leased(registration) == 2, "the new registration's lease was dropped"
        held = sum(lease.slot.nbytes for lease in granted)
        assert engine.l1.used_bytes == held  # the late request's lease went with its registration
    finally:
        go.set()
        client.close()
        stop_serving(server, thread)


def wait_past(seconds: float) -> Callable[..., Any]:
    """A wrapper that runs ``fn`` once ``seconds`` have passed since it was called: a server that
    finishes the request after its client's timeout."""

    def slowed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                time.sleep(until - time.monotonic())
            return fn(*args, **kwargs)

        return run

    return slowed


@pytest.mark.parametrize("op", ["store_reserve", "load"])
def test_a_request_finished_after_its_timeout_grants_nothing(tmp_path, monkeypatch, op) -> None:
    """The client gave up on a store_reserve or a load the server finished late: the reply's
    reservation, leases and pins are given back, not held for a ticket no one will close (64 of them
    and every later store and load of the instance is refused)."""
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("shared-l1", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0)
    engine, shared = server.engine, server.service.shared_l1
    assert shared is not None
    try:
        pool = shared_pool(seed=3)
        info = client.register(pool, 0, 1, "m", TPB, pool_sharing="shared-l1")
        tokens = list(range(4 * CHUNK))
        if op == "load":
            assert client.store(BlockTransfer(tokens, None, list(range(4 * CHUNK // TPB)), 0, len(tokens)))
            req = P.Load(instance_id=info.instance_id, tokens=tokens, end=len(tokens), cap=info.cap)
            monkeypatch.setattr(engine, "hold_load", wait_past(0.3)(engine.hold_load))
        else:
            req = P.StoreReserve(instance_id=info.instance_id, tokens=tokens, end=len(tokens), lease=2)
            req.cap = info.cap
            monkeypatch.setattr(engine, "reserve_store", wait_past(0.3)(engine.reserve_store))
        registration = server.service.instances.get(info.instance_id).registration
        used, leased = engine.l1.used_bytes, shared.leased(registration)  # the store's lease stays
        req.timeout_ms = 200
        lane = connect(f"ipc://{path}")
        reply = call(lane, req)
        lane.close()
        assert not reply.ok and reply.error.code == "expired", reply
        assert shared.open_tickets(registration) == 0 and shared.leased(registration) == leased
        assert engine.l1.used_bytes == used and engine.snapshot().l1.pinned_chunks == 0
    finally:
        client.close()
        stop_serving(server, thread)


def test_a_request_that_waited_for_a_lane_tells_the_server_only_the_time_left(tmp_path, monkeypatch) -> None:
    """The client's timeout runs from the call, the server's from the request's arrival: a request that
    first waited for a lane carries only what is left, so the server gives up no later than the client
    (and gives back what a reply too late would grant)."""
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("shared-l1", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0, lanes=1, heartbeat_interval_s=0)
    seen: list[int | None] = []
    handle = server.service.handle

    def noting_timeouts(req: Any, call: Any) -> Any:
        if isinstance(req, P.StoreReserve):
            seen.append(req.timeout_ms)
        return handle(req, call)

    monkeypatch.setattr(server.service, "handle", noting_timeouts)
    try:
        client.register(shared_pool(seed=4), 0, 1, "m", TPB, pool_sharing="shared-l1")
        lane_held, lane_free = threading.Event(), threading.Event()

        def busy_lane() -> None:  # another thread's call holds the only lane for a while
            with client.lanes.hold():
                lane_held.set()
                lane_free.wait(20)

        holder = threading.Thread(target=busy_lane)
        holder.start()
        assert lane_held.wait(20)
        waited = 2.0
        timer = threading.Timer(waited, lane_free.set)
        timer.start()
        tokens = list(range(4 * CHUNK))
        assert client.store(BlockTransfer(tokens, None, list(range(4 * CHUNK // TPB)), 0, len(tokens)))
        holder.join()
        assert seen and seen[0] is not None and seen[0] <= (20.0 - waited) * 1000 + 50, seen
    finally:
        client.close()
        stop_serving(server, thread)
