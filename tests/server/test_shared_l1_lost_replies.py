"""Shared-L1 replies the worker never read: its ``store_reserve`` or ``load`` call failed (timed out,
its connection broke) after the server had sent the reply, so the worker never learned the ticket
and leased slots to report done. Its ``abandon`` gives them back at once; before, they were held until
the registration went, and 64 of them refused every later store and load of the instance."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from in_process_server import start_serving, stop_serving
from raw_lane import connect, framed, read_reply
from support.server_process import CHUNK, TPB, shared_pool

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient
from lmcache.server.client_errors import ServerUnavailable
from lmcache.server.client_lanes import Lane
from lmcache.transfer import BlockTransfer

TIMEOUT_S = 2.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def served(tmp_path):
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("shared-l1", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0, heartbeat_interval_s=0)
    try:
        yield server, client, f"ipc://{path}"
    finally:
        client.close()
        stop_serving(server, thread)


def transfer_of(chunks: int) -> BlockTransfer:
    tokens = list(range(chunks * CHUNK))
    return BlockTransfer(tokens, None, list(range(chunks * CHUNK // TPB)), 0, len(tokens))


def answered(server: Any, monkeypatch: pytest.MonkeyPatch, op: type) -> threading.Event:
    """Set once the server has answered an ``op`` request (its reply posted, not failed)."""
    done = threading.Event()
    handle = server.service.handle

    def noting(req: Any, call: Any) -> Any:
        value = handle(req, call)
        if isinstance(req, op):
            done.set()
        return value

    monkeypatch.setattr(server.service, "handle", noting)
    return done


def blind_until(monkeypatch: pytest.MonkeyPatch, sent: threading.Event) -> None:
    """Every lane reads nothing once ``sent`` is set, as if the reply came too late: the call
    waiting for it times out and closes its lane, the reply unread."""
    receive = Lane.receive

    def blind(self: Lane, timeout: float, spin: float = 0.0) -> bytes | None:
        if not sent.wait(20):
            return receive(self, timeout, spin)
        time.sleep(min(timeout, 0.01))
        return None

    monkeypatch.setattr(Lane, "receive", blind)


def pinned(server: Any) -> int:
    return server.engine.snapshot().l1.pinned_chunks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [4, 6], ids=["one_part", "two_parts"])
def test_a_load_whose_reply_was_never_read_leaves_no_ticket_and_no_pin(
    served, monkeypatch, chunks, device
) -> None:
    server, client, _ = served
    shared = server.service.shared_l1
    pool = shared_pool(seed=5).to(device)
    info = client.register(pool, 0, 1, "m", TPB, pool_sharing="shared-l1")
    registration = server.service.instances.get(info.instance_id).registration
    assert client.store(transfer_of(chunks)) == chunks * CHUNK
    stored = pool[: chunks * CHUNK // TPB].clone()
    pool[: chunks * CHUNK // TPB] = 0
    stream = torch.cuda.current_stream() if device == "cuda" else None
    with monkeypatch.context() as patch:
        sent = answered(server, patch, P.Load)
        blind_until(patch, sent)
        with pytest.raises(ServerUnavailable, match="no reply to load"):
            client.retrieve(transfer_of(chunks), timeout_s=TIMEOUT_S, stream=stream)
    client.stats()  # served after the client's abandon, sent on this thread's lane
    assert shared.open_tickets(registration) == 0
    assert pinned(server) == 0
    assert client.retrieve(transfer_of(chunks), stream=stream) == chunks * CHUNK  # the instance loads on
    if stream is not None:
        stream.synchronize()
    assert torch.equal(pool[: chunks * CHUNK // TPB], stored)


def test_a_reservation_whose_reply_was_never_read_gives_its_slots_and_lease_back(served, monkeypatch) -> None:
    server, client, _ = served
    shared = server.service.shared_l1
    info = client.register(shared_pool(seed=6), 0, 1, "m", TPB, pool_sharing="shared-l1")
    registration = server.service.instances.get(info.instance_id).registration
    used = server.engine.l1.used_bytes
    with monkeypatch.context() as patch:
        sent = answered(server, patch, P.StoreReserve)
        blind_until(patch, sent)
        with pytest.raises(ServerUnavailable, match="no reply to store_reserve"):
            client.store(transfer_of(4), timeout_s=TIMEOUT_S)
    client.stats()
    assert shared.open_tickets(registration) == 0 and shared.leased(registration) == 0
    assert server.engine.l1.used_bytes == used  # neither the reservation nor the lease holds a slot
    assert client.lookup(transfer_of(4).prompt) == 0  # nothing of it was published
    assert client.store(transfer_of(4)) == 4 * CHUNK


def test_a_reservation_abandoned_before_its_reply_is_ready_is_answered_expired_and_holds_nothing(
    served, monkeypatch
) -> None:
    """The abandon may overtake its request (the client gave up while the server still served it, and
    the abandon came on another connection): the reply, once ready, grants nothing."""
    server, client, url = served
    shared = server.service.shared_l1
    info = client.register(shared_pool(seed=7), 0, 1, "m", TPB, pool_sharing="shared-l1")
    registration = server.service.instances.get(info.instance_id).registration
    used = server.engine.l1.used_bytes
    entered, go = threading.Event(), threading.Event()
    reserve_store = server.engine.reserve_store

    def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert go.wait(20)
        return reserve_store(*args, **kwargs)

    monkeypatch.setattr(server.engine, "reserve_store", gated)
    tokens = transfer_of(4).prompt
    reserve = P.StoreReserve(
        instance_id=info.instance_id, tokens=tokens, end=len(tokens), lease=2, cap=info.cap
    )
    reserve.rid = 77
    with connect(url) as lane, connect(url) as other:
        lane.sendall(framed(P.encode(reserve)))
        assert entered.wait(20)
        other.sendall(
            framed(P.encode(P.Abandon(instance_id=info.instance_id, rids=[77], cap=info.cap, rid=1)))
        )
        given_back = read_reply(other)
        assert given_back.ok and given_back.value == 0  # nothing sent yet: nothing to give back
        go.set()
        reply = read_reply(lane)
    assert not reply.ok and reply.error.code == "expired", reply
    assert shared.open_tickets(registration) == 0 and shared.leased(registration) == 0
    assert server.engine.l1.used_bytes == used


def test_an_abandon_names_only_its_own_instances_requests(served) -> None:
    server, client, url = served
    info = client.register(shared_pool(seed=8), 0, 1, "m", TPB, pool_sharing="shared-l1")
    with connect(url) as lane:
        lane.sendall(
            framed(P.encode(P.Abandon(instance_id=info.instance_id, rids=[1], cap=b"x" * 32, rid=3)))
        )
        reply = read_reply(lane)
        assert not reply.ok and reply.error.code == "unknown_instance", reply
        lane.sendall(framed(P.encode(P.Abandon(instance_id=info.instance_id, rids=[0], cap=info.cap, rid=4))))
        reply = read_reply(lane)
        assert not reply.ok and reply.error.code == "invalid" and "rids" in reply.error.message, reply
