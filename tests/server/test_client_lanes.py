"""The client's lane pool against a server address that accepts no connection."""

import socket
import time
from collections.abc import Iterator

import pytest

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
            pool.call(b"", 1, "ping", 0.3)
        assert pool.down
        with pytest.raises(ServerUnavailable, match="no answer to a connect"):  # a short probe
            pool.call(b"", 2, "ping", 5.0)
        began = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer a connect recently"):
            pool.call(b"", 3, "ping", 5.0)  # inside the quiet window: no connect at all
        assert time.monotonic() - began < PROBE_QUIET_S
    finally:
        pool.close()
