"""A pinning lookup the server finishes after its client gave up (the call timed out and closed its
connection): its pins go at once. Before, they stayed until the pin TTL, counted against the
instance's share of L1, though no load would ever name them."""

from __future__ import annotations

import threading
import time
from typing import Any

from in_process_server import start_serving, stop_serving
from raw_lane import connect, framed
from support.server_process import CHUNK, TPB, shared_pool

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient
from lmcache.server.inline_cost import InlineCosts
from lmcache.transfer import BlockTransfer


def test_a_lookup_finished_after_its_client_left_keeps_no_pins(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("export", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0, heartbeat_interval_s=0)
    try:
        info = client.register(shared_pool(seed=9), 0, 1, "m", TPB, pool_sharing="export")
        tokens = list(range(4 * CHUNK))
        assert client.store(BlockTransfer(tokens, None, list(range(4 * CHUNK // TPB)), 0, len(tokens)))
        entered, go, served = threading.Event(), threading.Event(), threading.Event()
        calls: list[Any] = []
        lookup, handle = server.engine.lookup, server.service.handle

        def gated(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            assert go.wait(20)
            return lookup(*args, **kwargs)

        def noting(req: Any, call: Any) -> Any:
            if isinstance(req, P.Lookup):
                calls.append(call)
            try:
                return handle(req, call)
            finally:
                if isinstance(req, P.Lookup):
                    served.set()

        monkeypatch.setattr(server.engine, "lookup", gated)
        monkeypatch.setattr(server.service, "handle", noting)
        monkeypatch.setattr(InlineCosts, "runs_inline", lambda self, req: False)  # the I/O thread stays free
        req = P.Lookup(instance_id=info.instance_id, tokens=tokens, pin_id="r1", cap=info.cap, rid=5)
        with connect(f"ipc://{path}") as lane:
            lane.sendall(framed(P.encode(req)))
            assert entered.wait(20)
        until = time.monotonic() + 20  # the server notices the closed connection
        while not calls[0].expiring():
            assert time.monotonic() < until, "the server never noticed its client left"
            time.sleep(0.01)
        go.set()
        assert served.wait(20)
        assert server.engine.snapshot().l1.pinned_chunks == 0
        assert client.stats().pinned_lookups == 0
    finally:
        client.close()
        stop_serving(server, thread)
