"""A shared-L1 worker whose process stood still longer than the server's client timeout, on a
connection where the server cannot watch the process (TCP): the server reaped it and handed its
leased slots to other chunks, so on resuming it must not copy into them."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from in_process_server import client_of, start_serving, stop_serving
from support.server_process import CHUNK, TPB, shared_pool, wait_until

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient, ServerUnavailable
from lmcache.server.client_registrations import Registration
from lmcache.server.server import CacheServer
from lmcache.server.shared_l1_worker import SharedL1Copier
from lmcache.transfer import BlockTransfer

POOL_BLOCKS = list(range(64))  # shared_pool's blocks: a prompt of 16 chunks
LENGTH = len(POOL_BLOCKS) * TPB


def whole(first: int) -> BlockTransfer[int]:
    """A prompt of ``LENGTH`` tokens from ``first``, all of the pool's blocks."""
    return BlockTransfer(list(range(first, first + LENGTH)), None, POOL_BLOCKS, 0, LENGTH)


@pytest.fixture
def server() -> Iterator[CacheServer]:
    """A shared-L1 server that reaps after 60 s of silence (the tests reap with ``server.reap(now)``)."""
    served, thread = start_serving("shared-l1", client_timeout_s=60.0)
    yield served
    stop_serving(served, thread)


@dataclass
class Worker:
    """A client over TCP (the server cannot watch its process) with one shared-L1 pool registered."""

    client: CacheServerClient
    info: P.RegisterInfo
    registration: Registration
    copier: SharedL1Copier


@pytest.fixture
def worker(server: CacheServer) -> Iterator[Callable[[torch.Tensor], Worker]]:
    """Registers a pool from a new client without heartbeats (the tests say when it was last heard of)."""
    clients: list[CacheServerClient] = []

    def register(pool: torch.Tensor) -> Worker:
        client = CacheServerClient(
            f"tcp://127.0.0.1:{server.tcp_port}", timeout_s=20.0, heartbeat_interval_s=0
        )
        clients.append(client)
        info = client.register(pool, 0, 1, "m", TPB, pool_sharing="shared-l1")
        registration = client.registrations.get(info.instance_id)
        assert registration is not None and registration.copier is not None
        return Worker(client, info, registration, registration.copier)

    yield register
    for client in clients:
        client.close()


def test_a_worker_reaped_while_it_stood_still_does_not_copy_into_its_old_leases(server, worker) -> None:
    paused = worker(shared_pool(seed=5))
    other = client_of(server)
    try:
        assert paused.info.reap_after_s == 60.0  # TCP: the server cannot watch this process
        assert paused.client.store(whole(0)) == LENGTH
        leased = paused.copier.leased  # slots its next store's first chunks go into at once
        assert leased > 0

        # It stands still longer than the client timeout: the server reaps it, its leases go back.
        paused.registration.heard_at = paused.client.registrations.clock() - 100.0
        server.reap(now=time.monotonic() + 100.0)
        assert server.reaped == 1

        # Another engine stores until its chunks lie in every slot freed.
        other_pool = shared_pool(seed=6)
        other.register(other_pool, 0, 1, "m", TPB, pool_sharing="shared-l1")
        expected = other_pool.clone()
        firsts = [100_000 + i * LENGTH for i in range(leased // (LENGTH // CHUNK) + 2)]
        for first in firsts:
            assert other.store(whole(first)) == LENGTH

        # The paused worker resumes with its next store.
        assert paused.client.store(whole(50_000)) == LENGTH

        for first in firsts:
            other_pool.zero_()
            assert other.lookup(list(range(first, first + LENGTH)), pin_id="p") == LENGTH
            assert other.retrieve(whole(first), "p") == LENGTH
            assert torch.equal(other_pool, expected), "another engine's chunks were overwritten"
    finally:
        other.close()


class SteppedClock:
    """The host's monotonic clock, plus the stand-stills a test adds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def stand_still_in(copier: SharedL1Copier, method: str, clock: SteppedClock, call: int = 1) -> None:
    """The process stands still 100 s just before its ``call``-th call of ``copier.method``."""
    step, calls = getattr(copier, method), []

    def stand_still(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            clock.offset += 100.0
        return step(*args, **kwargs)

    setattr(copier, method, stand_still)


@pytest.mark.parametrize("op", ["store", "leased store", "load"])
def test_copies_after_standing_still_past_half_the_reap_time_are_not_made(worker, op: str) -> None:
    """The process stands still between asking the server and enqueueing its copies (the server's
    answer read, or its request just sent while copies into leased slots go on): the slots may be
    other chunks' by then, so no copy touches them; the store publishes nothing and the load fails
    (its request does, loudly)."""
    w = worker(shared_pool(seed=7))
    client = w.client
    clock = client.registrations.clock = SteppedClock()
    prompt = list(range(LENGTH))
    if op == "load":
        assert client.store(whole(0)) == LENGTH
        assert client.lookup(prompt, pin_id="p") == LENGTH
        run = functools.partial(client.retrieve, whole(0), "p")
        stand_still_in(w.copier, "add_load", clock)  # the reply is in: its slots are copied from next
    elif op == "leased store":
        assert client.store(whole(LENGTH)) == LENGTH and w.copier.leased  # the next store's lease
        run = functools.partial(client.store, whole(0))
        stand_still_in(w.copier, "add", clock, call=2)  # a leased chunk copied; the request on its way
    else:
        run = functools.partial(client.store, whole(0))
        stand_still_in(w.copier, "add_chunks", clock)  # the reply is in: its reserved slots next
    with pytest.raises(ServerUnavailable, match="not heard from the cache server"):
        run()
    if op != "load":
        assert client.lookup(prompt) == 0  # nothing published


def test_leases_dropped_after_standing_still_go_back_to_a_server_that_still_holds_them(
    server, worker
) -> None:
    """Silent for over half the reap time but not reaped: the leases the worker no longer trusts are
    given back, not held by the server for nobody (its lease cap would stay full)."""
    w = worker(shared_pool(seed=8))
    shared = server.service.shared_l1
    assert shared is not None
    assert w.client.store(whole(0)) == LENGTH
    held = server.service.instances.get(w.info.instance_id).registration
    assert w.copier.leased == shared.leased(held) > 0
    w.registration.heard_at = w.client.registrations.clock() - 100.0
    assert w.client.store(whole(LENGTH)) == LENGTH
    wait_until(lambda: w.copier.leased == shared.leased(held), "the leases held for nobody to go")  # one-way
    assert w.copier.leased > 0
    assert server.reaped == 0


def test_copies_waiting_while_the_instance_registers_again_are_not_made(server, worker) -> None:
    """The server reaps the instance while its store's copies wait (for the forward, or a stopped
    process), and its heartbeat registers it again at once: the fresh registration vouches for its own
    slots only, not for those the waiting copies were given (freed with the reaped one)."""
    w = worker(shared_pool(seed=9))
    step = w.copier.add_chunks

    def reaped_and_registered_again(*args: Any, **kwargs: Any) -> Any:
        server.reap(now=time.monotonic() + 100.0)
        w.client.heartbeat()  # told the instance is unknown: registers it again
        return step(*args, **kwargs)

    w.copier.add_chunks = reaped_and_registered_again
    with pytest.raises(ServerUnavailable, match="registered with the cache server again"):
        w.client.store(whole(0))
    assert server.reaped == 1 and w.client.registrations.cap(w.info.instance_id) != w.info.cap


def test_a_load_after_a_quiet_spell_asks_the_server_for_its_slots_instead_of_failing(worker) -> None:
    """Idle for over half the reap time (heartbeats off) but not reaped: the lookup's slots may have
    been let go, so the load copies only from the slots its reply names, and succeeds."""
    pool = shared_pool(seed=10)
    expected = pool.clone()
    w = worker(pool)
    assert w.client.store(whole(0)) == LENGTH
    prompt = list(range(LENGTH))
    assert w.client.lookup(prompt, pin_id="p", chunk_hashes=w.client.chunk_hashes(prompt)) == LENGTH
    w.registration.heard_at = w.client.registrations.clock() - 40.0  # quiet: over half of 60 s
    pool.zero_()
    assert w.client.retrieve(whole(0), "p") == LENGTH
    assert torch.equal(pool, expected)


def test_a_load_whose_copies_fail_while_its_reply_travels_releases_the_pins_the_reply_took(
    server, worker
) -> None:
    """The lookup named some of the load's chunks: their copies start while the load's request is on
    its way. When they are refused (the process stood still), the reply still opens a ticket on the
    server: it is read and given back, not left pinning chunks until the registration goes."""
    w = worker(shared_pool(seed=11))
    clock = w.client.registrations.clock = SteppedClock()
    shared = server.service.shared_l1
    assert shared is not None
    assert w.client.store(whole(0)) == LENGTH
    half = list(range(LENGTH // 2))  # the lookup names the first half's slots only
    assert w.client.lookup(half, pin_id="p", chunk_hashes=w.client.chunk_hashes(half)) == LENGTH // 2
    stand_still_in(w.copier, "add_looked_up", clock)
    with pytest.raises(ServerUnavailable, match="not heard from the cache server"):
        w.client.retrieve(whole(0), "p")
    held = server.service.instances.get(w.info.instance_id).registration
    wait_until(lambda: shared.open_tickets(held) == 0, "the unread reply's ticket to be given back")
    assert server.engine.snapshot().l1.pinned_chunks == 0
