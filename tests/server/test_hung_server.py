"""A server that accepts connections but answers nothing (stopped with SIGSTOP, wedged): once a request
has gone unanswered, the client's fail-fast calls wait only a moment for their replies instead of
each its timeout (TRT-LLM's scheduler would wait 3 s per lookup), loads promised to TRT-LLM are still
given their whole timeout, claimed lookups promise no more hits, and the first reply ends it all."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server_process import MODEL, TPB, ServerProcess, shared_pool

from lmcache.server.client import CacheServerClient, ServerUnavailable
from lmcache.server.client_lanes import PROBE_REPLY_S
from lmcache.transfer import BlockTransfer

TOKENS = list(range(96))


@pytest.fixture
def stored(workdir: Path) -> Iterator[tuple[ServerProcess, CacheServerClient]]:
    server = ServerProcess(workdir).start()
    client = CacheServerClient(server.ipc_url, timeout_s=10.0, heartbeat_interval_s=0)
    try:
        client.register(shared_pool(seed=1), 0, 1, MODEL, TPB, pool_sharing="export")
        assert client.store(BlockTransfer(TOKENS, None, list(range(12)), 0, 96)) == 96
        yield server, client
    finally:
        server.proc.send_signal(signal.SIGCONT)
        client.close(unregister=False)
        server.stop()


def test_after_an_unanswered_request_lookups_fail_at_once_and_loads_are_still_tried(stored) -> None:
    server, client = stored
    assert client.registrations.can_claim(client.instance_id)  # hits could be claimed with no reply
    server.proc.send_signal(signal.SIGSTOP)
    with pytest.raises(ServerUnavailable, match="no reply to lookup"):
        client.lookup(TOKENS, timeout_s=0.3)
    brief = rf"no reply to lookup\w* .* within {PROBE_REPLY_S:g} s"
    with pytest.raises(ServerUnavailable, match=brief):
        client.lookup(TOKENS, timeout_s=30.0)
    with pytest.raises(ServerUnavailable, match=brief):
        client.lookup(TOKENS, pin_id="r1", timeout_s=30.0)  # no hit claimed from the server's index
    load = BlockTransfer(TOKENS, None, list(range(20, 32)), 0, 64)
    with pytest.raises(ServerUnavailable, match="no reply to retrieve .* within 0.3 s"):
        client.retrieve(load, timeout_s=0.3)  # promised: its whole timeout
    server.proc.send_signal(signal.SIGCONT)
    assert client.retrieve(load) == 64  # tried in full; its reply ends the quiet spell
    assert client.lookup(TOKENS) == 96
