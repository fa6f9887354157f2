"""Bytes of received requests the server holds per connection and in total (docs/security.md, 4)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from raw_lane import connect, framed, read_reply
from support.server_process import TPB, shared_pool

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient

MODEL = "test/queue"


def test_requests_waiting_behind_a_running_one_are_capped_in_bytes(
    make_server, workdir: Path, monkeypatch
) -> None:
    """Complete frames a connection pipelines wait decoded in its queue: at most one largest frame's
    worth per connection, and --max-pending-mb for all connections together; beyond, ``limit``."""
    path = str(workdir / "q.sock")
    server = make_server(ipc_path=path, max_frame_bytes=1 << 20, max_pending_bytes=4 << 20, max_workers=2)
    client = CacheServerClient(f"ipc://{path}", timeout_s=20.0, heartbeat_interval_s=0)
    info = client.register(shared_pool(seed=7), 0, 1, MODEL, TPB, pool_sharing="export")
    release = threading.Event()
    handle = server.service.handle

    def held(req, call):  # the first request of each lane runs until the test lets it go
        if req.rid == 1:
            assert release.wait(20)
        return handle(req, call)

    monkeypatch.setattr(server.service, "handle", held)

    def lookup(rid: int) -> bytes:  # 600 KiB of token ids: too long to run on the I/O thread
        tokens = bytes(600 << 10)
        return framed(P.encode(P.Lookup(rid=rid, instance_id=info.instance_id, tokens=tokens, cap=info.cap)))

    lanes = [connect(f"ipc://{path}") for _ in range(2)]
    try:
        for lane in lanes:  # a running request, then six waiting ones of 600 KiB each
            lane.sendall(b"".join(lookup(rid) for rid in range(1, 8)))

        def read_all() -> bool:  # every frame but the two running ones queued or refused
            return server.dispatcher.waiting() + server.refusals.get("queued_bytes", 0) == 12

        deadline = time.monotonic() + 20
        while not read_all() and time.monotonic() < deadline:
            time.sleep(0.01)  # the I/O thread reads the lanes' frames; nothing runs until release
        assert read_all()
        refused = {}
        for lane in lanes:
            lane.settimeout(20)
        release.set()
        for n, lane in enumerate(lanes):
            for _ in range(7):
                reply = read_reply(lane)
                if not reply.ok:
                    refused.setdefault(n, []).append((reply.error.code, reply.error.message))
    finally:
        release.set()
        for lane in lanes:
            lane.close()
        client.close()
    messages = [m for got in refused.values() for _, m in got]
    assert all(code == "limit" for got in refused.values() for code, _ in got)
    # One lane may queue 3 MiB (one largest frame, --max-frame-mb 1): its sixth waiting request is refused.
    assert any("this connection has" in m and "--max-frame-mb" in m for m in messages)
    # Both lanes together may hold 4 MiB (--max-pending-mb): the second lane meets that cap.
    assert any("the server has" in m and "--max-pending-mb" in m for m in messages)
    assert server.refusals["queued_bytes"] == len(messages)
