"""The client's lane pool against a server address that accepts no connection."""

import socket
import time
from collections.abc import Iterator

import pytest
from support.server_process import server_secret

from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerUnavailable
from lmcache.server.client_lanes import PROBE_QUIET_S, LanePool


@pytest.fixture
def unanswered_url() -> Iterator[str]:
    """A TCP address whose listener never accepts and whose accept queue is full: connects to it get
    no answer (the kernel drops their SYNs), like a host that drops packets."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_an_unanswered_connect_makes_fail_fast_calls_fail_at_once_for_a_while(unanswered_url: str) -> None:
    pool = LanePool(unanswered_url, size=1, fail_fast=True)
    try:
        with pytest.raises(ServerUnavailable):  # the first call waits for its connect, then times out
            pool.submit(b"", 1, "ping", 0.3).result()
        assert pool.down
        with pytest.raises(ServerUnavailable, match="no answer to a connect"):  # a short probe
            pool.submit(b"", 2, "ping", 5.0).result()
        began = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer a connect recently"):
            pool.submit(b"", 3, "ping", 5.0).result()  # inside the quiet window: no connect at all
        assert time.monotonic() - began < PROBE_QUIET_S
    finally:
        pool.close()


def _stats_frame(rid: int) -> bytes:
    return P.encode(P.Stats(rid=rid, auth=server_secret()))


def test_submitted_calls_hold_their_lane_until_read_and_cancel_closes_it(inproc_server) -> None:
    pool = LanePool(f"tcp://127.0.0.1:{inproc_server.tcp_port}", size=2)
    try:
        first = pool.submit(_stats_frame(1), 1, "stats", 10.0)
        second = pool.submit(_stats_frame(2), 2, "stats", 10.0)  # the first lane is still taken
        assert pool.lanes == 2
        assert second.result().rid == 2 and first.result().rid == 1  # read in any order
        with pytest.raises(RuntimeError, match="already taken"):
            first.result()
        third = pool.submit(_stats_frame(3), 3, "stats", 10.0)
        third.cancel()  # its reply can never reach a later call
        assert pool.lanes == 1
        assert pool.submit(_stats_frame(4), 4, "stats", 10.0).result().rid == 4
    finally:
        pool.close()


def test_a_one_way_frame_leaves_its_lane_to_the_same_threads_next_call(inproc_server) -> None:
    pool = LanePool(f"tcp://127.0.0.1:{inproc_server.tcp_port}", size=4)
    try:
        report = P.LoadDone(instance_id=3, ticket=9, one_way=True, rid=1, auth=server_secret())
        pool.send(P.encode(report), "load_done", 10.0)  # refused (unknown instance), but not answered
        assert pool.submit(_stats_frame(2), 2, "stats", 10.0).result().rid == 2
        assert pool.opened == 1 and inproc_server.errors == 1
    finally:
        pool.close()


def test_a_wake_up_is_not_answered_and_the_threads_next_call_follows_it(inproc_server) -> None:
    from lmcache.server.client import CacheServerClient

    url = f"tcp://127.0.0.1:{inproc_server.tcp_port}"
    with CacheServerClient(url, timeout_s=10, secret=server_secret()) as client:
        before = inproc_server.requests
        client.wake()  # served, never answered: nothing is left to read on the lane
        assert client.ping().server_id == inproc_server.server_id
        assert inproc_server.requests == before + 2 and inproc_server.errors == 0
        assert client.lanes.opened == 1  # the call after the wake-up took its lane
    with CacheServerClient("ipc:///nonexistent/lmcache.sock", timeout_s=1) as down:
        down.wake()  # a server that cannot be reached is for the next call to report
