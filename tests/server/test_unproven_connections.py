"""TCP connections that have not shown the server secret (``lmcache.server.transport``): anyone who
reaches the port may open one and ping, so they cannot crowd out the clients the server serves."""

from __future__ import annotations

import socket
import time

import pytest
from raw_lane import connect, framed, read_frame, read_reply

from lmcache.server import protocol as P
from lmcache.server import transport
from lmcache.server.client import CacheServerClient, LimitExceeded
from lmcache.server.server import CacheServer


def _url(server: CacheServer) -> str:
    return f"tcp://127.0.0.1:{server.tcp_port}"


SECRET = b"s" * 32


def _ping(sock: socket.socket, auth: bytes | None = None) -> P.Reply:
    sock.sendall(framed(P.encode(P.Ping(rid=1, auth=auth))))
    return read_reply(sock)


def test_tcp_connections_without_the_secret_give_way_to_those_with_it(make_server, monkeypatch) -> None:
    """Anyone reaching the port may connect and ping, so such connections cannot hold the server's:
    at a cap, the oldest past its grace is closed (told why) for a new connection; within its grace,
    the new connection is refused as before; a connection that carried the secret never gives way."""
    monkeypatch.setattr(transport, "UNPROVEN_GRACE_S", 0.0)
    server = make_server(secret=SECRET, max_connections=3)
    with CacheServerClient(_url(server), timeout_s=20.0, secret=SECRET, heartbeat_interval_s=0) as client:
        assert client.ping().server_id == server.server_id  # its lane proved itself
        intruders = [connect(_url(server)) for _ in range(2)]
        for sock in intruders:
            assert _ping(sock).ok  # liveness is open to all: the server is full now
        with client.lanes.hold():
            assert client.ping().server_id == server.server_id  # on a new lane
        error = read_reply(intruders[0]).error
        assert error is not None and error.code == "unauthorized" and "LMCACHE_SERVER_SECRET" in error.message
        assert read_frame(intruders[0]) is None
        monkeypatch.setattr(transport, "UNPROVEN_GRACE_S", 60.0)
        with (
            client.lanes.hold(),
            client.lanes.hold(),
            pytest.raises(LimitExceeded, match="--max-connections"),
        ):
            client.ping()
        assert _ping(intruders[1]).ok  # still within its grace: it stayed
        intruders[1].close()
    assert server.refusals["unproven"] == 1


def test_unfinished_frames_of_connections_without_the_secret_take_a_quarter_of_the_budget(
    make_server,
) -> None:
    server = make_server(secret=SECRET, max_pending_bytes=4 << 20)
    half = P.FRAME_HEADER.pack(2 << 20) + bytes(1)  # half the budget announced, one byte of it sent
    with connect(_url(server)) as intruder:
        intruder.sendall(half)
        error = read_reply(intruder).error
        assert error is not None and error.code == "limit" and "server secret" in error.message
    with connect(_url(server)) as proven:
        assert _ping(proven, SECRET).ok
        proven.sendall(half)
        proven.sendall(bytes((2 << 20) - 1))  # the rest: a whole frame, read (and refused as malformed)
        error = read_reply(proven).error
        assert error is not None and error.code == "malformed"


def test_a_connection_without_the_secret_is_closed_once_the_frame_timeout_passed(make_server) -> None:
    """However busy it keeps itself with pings; one that carried the secret stays open."""
    server = make_server(secret=SECRET, frame_timeout_s=0.5)
    with connect(_url(server)) as intruder, connect(_url(server)) as proven:
        assert _ping(proven, SECRET).ok
        deadline = time.monotonic() + 20
        open_ = True
        while open_ and time.monotonic() < deadline:
            try:  # the reply, or the server's closing frame, or a reset if a ping crossed the close
                intruder.sendall(framed(P.encode(P.Ping(rid=1))))
                frame = read_frame(intruder)
                open_ = frame is not None and P.decode_reply(frame).ok
            except OSError:
                open_ = False
            time.sleep(0.05)
        assert not open_ and server.refusals["unproven"] == 1
        assert _ping(proven, SECRET).ok
