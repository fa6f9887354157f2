"""A shared-L1 worker whose process stood still longer than the server's client timeout, on a
connection where the server cannot watch the process (TCP): the server reaped it and handed its
leased slots to other chunks, so on resuming it must not copy into them."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
import torch
from in_process_server import client_of, start_serving, stop_serving
from support.server_process import CHUNK, TPB, shared_pool

from lmcache.server.client import CacheServerClient, ServerUnavailable
from lmcache.transfer import BlockTransfer

POOL_BLOCKS = list(range(64))  # shared_pool's blocks: a prompt of 16 chunks
LENGTH = len(POOL_BLOCKS) * TPB


def whole(first: int) -> BlockTransfer[int]:
    """A prompt of ``LENGTH`` tokens from ``first``, all of the pool's blocks."""
    return BlockTransfer(list(range(first, first + LENGTH)), None, POOL_BLOCKS, 0, LENGTH)


def test_a_worker_reaped_while_it_stood_still_does_not_copy_into_its_old_leases() -> None:
    server, thread = start_serving("shared-l1", client_timeout_s=60.0)
    paused = CacheServerClient(f"tcp://127.0.0.1:{server.tcp_port}", timeout_s=20.0, heartbeat_interval_s=0)
    other = client_of(server)
    try:
        info = paused.register(shared_pool(seed=5), 0, 1, "m", TPB, pool_sharing="shared-l1")
        assert info.reap_after_s == 60.0  # TCP: the server cannot watch this process
        assert paused.store(whole(0)) == LENGTH
        registration = paused.registrations.get(info.instance_id)
        assert registration is not None and registration.copier is not None
        leased = registration.copier.leased  # slots its next store's first chunks go into at once
        assert leased > 0

        # It stands still longer than the client timeout: the server reaps it, its leases go back.
        registration.heard_at = paused.registrations.clock() - 100.0
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
        assert paused.store(whole(50_000)) == LENGTH

        for first in firsts:
            other_pool.zero_()
            assert other.lookup(list(range(first, first + LENGTH)), pin_id="p") == LENGTH
            assert other.retrieve(whole(first), "p") == LENGTH
            assert torch.equal(other_pool, expected), "another engine's chunks were overwritten"
    finally:
        paused.close()
        other.close()
        stop_serving(server, thread)


class SteppedClock:
    """The host's monotonic clock, plus the stand-stills a test adds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.mark.parametrize("op", ["store", "load"])
def test_a_copy_after_standing_still_past_half_the_reap_time_does_not_count(op: str) -> None:
    """The process stands still between the server's answer and its copies: the slots named may be
    other chunks' by then, so the store is not published and the load fails (the request does,
    loudly), instead of copying from or into them."""
    server, thread = start_serving("shared-l1", client_timeout_s=60.0)
    client = CacheServerClient(f"tcp://127.0.0.1:{server.tcp_port}", timeout_s=20.0, heartbeat_interval_s=0)
    clock = client.registrations.clock = SteppedClock()
    try:
        info = client.register(shared_pool(seed=7), 0, 1, "m", TPB, pool_sharing="shared-l1")
        registration = client.registrations.get(info.instance_id)
        assert registration is not None and registration.copier is not None
        copier = registration.copier
        if op == "load":
            assert client.store(whole(0)) == LENGTH
            assert client.lookup(list(range(LENGTH)), pin_id="p") == LENGTH
            run = functools.partial(client.retrieve, whole(0), "p")
            slow = "finish_load"
        else:
            run = functools.partial(client.store, whole(0))
            slow = "add_leases"  # the reply is in: its reserved slots are copied into next
        step = getattr(copier, slow)

        def stand_still(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            clock.offset += 100.0
            return result

        setattr(copier, slow, stand_still)
        with pytest.raises(ServerUnavailable, match="stood still"):
            run()
        if op == "store":
            assert client.lookup(list(range(LENGTH))) == 0  # nothing published
    finally:
        client.close()
        stop_serving(server, thread)
