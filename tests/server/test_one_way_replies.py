"""One-way frames (``store_done``, ``load_done``, ``ping``, claimed ``lookup_hashes``) get no reply, so
the client's next request on their lane never reads an answer that is not its own: not when the
server refuses the frame, not when serving it fails (issue of the lanes review)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerUnavailable
from lmcache.server.client_lanes import LanePool


class ParkedServer:
    """Holds the server's I/O thread between two poll rounds until :meth:`go`: frames a client sends
    meanwhile are read once it goes on, as a busy server reads two frames sent back to back, so the
    answer to the first (if any) cannot reach the client before it sent the second."""

    def __init__(self, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.parked = threading.Event()
        self.released = threading.Event()
        real = server.dispatcher.busy_poll

        def busy_poll(now: float) -> bool:  # called by the I/O thread before each poll
            if not self.released.is_set():
                self.parked.set()
                self.released.wait(20)
            return real(now)

        monkeypatch.setattr(server.dispatcher, "busy_poll", busy_poll)
        server.transport.wake()
        assert self.parked.wait(20), "the I/O thread did not come round"

    def go(self) -> None:
        self.released.set()


def _stats(rid: int) -> bytes:
    return P.encode(P.Stats(rid=rid))


def _pool(server: Any) -> LanePool:
    return LanePool(f"ipc://{server.config.ipc_path}", size=1)


@pytest.mark.parametrize("fault", ["too_large", "internal"])
def test_a_one_way_frame_the_server_fails_is_never_answered(
    make_server, workdir: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A one-way frame over ``--max-frame-mb`` (its request id readable) or one whose serving raises (an
    internal error) was answered: the next request on the lane read that error as its own answer, and
    its own reply then answered the request after it."""
    server = make_server(ipc_path=str(workdir / "s.sock"), max_frame_bytes=4096)
    if fault == "internal":
        touch = server.service.touch

        def failing_touch(req: Any, now: float) -> None:
            if isinstance(req, P.LoadDone):
                raise RuntimeError("a server fault while serving a one-way report")
            touch(req, now)

        monkeypatch.setattr(server.service, "touch", failing_touch)
        report = P.LoadDone(rid=1, instance_id=3, ticket=9, one_way=True)
    else:
        report = P.StoreDone(rid=1, instance_id=3, tokens=bytes(8192), one_way=True)
    parked = ParkedServer(server, monkeypatch)
    pool = _pool(server)
    try:
        pool.send(P.encode(report), "report", 10.0)
        second = pool.submit(_stats(2), 2, "stats", 10.0)  # on the same lane, behind the report
        parked.go()
        reply = second.result()
        assert reply.ok and reply.rid == 2
        assert pool.submit(_stats(3), 3, "stats", 10.0).result().rid == 3
        assert pool.opened == 1
    finally:
        parked.go()
        pool.close()


def test_a_refusal_after_a_one_way_frame_is_not_taken_for_the_next_requests_answer(
    make_server, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame over the connection's cap is refused before it is read (rid -1) and its connection
    closed: when a one-way frame went before the request on that lane, the refusal may be the one-way
    frame's; the request fails as unserved, not with the refusal as its own answer."""
    server = make_server(ipc_path=str(workdir / "s.sock"), max_pending_bytes_per_connection=4096)
    parked = ParkedServer(server, monkeypatch)
    pool = _pool(server)
    try:
        report = P.StoreDone(rid=1, instance_id=3, tokens=bytes(8192), one_way=True)
        pool.send(P.encode(report), "store_done", 10.0)
        second = pool.submit(_stats(2), 2, "stats", 10.0)
        parked.go()
        with pytest.raises(ServerUnavailable, match="one-way") as refused:
            second.result()
        assert "too_large" in str(refused.value)
        assert pool.lanes == 0  # the lane the server closed is gone
        assert pool.submit(_stats(3), 3, "stats", 10.0).result().rid == 3  # on a new lane
    finally:
        parked.go()
        pool.close()
