"""The metrics endpoint against hostile HTTP clients: silent, trickling, too many, hanging up."""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from lmcache.http_endpoint import MetricsEndpoint

REQUEST = b"GET / HTTP/1.0\r\n\r\n"


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> Iterator[MetricsEndpoint]:
    """An endpoint with no engine; ``@pytest.mark.parametrize("endpoint", [kwargs], indirect=True)``
    sets its limits."""
    ep = MetricsEndpoint(None, **getattr(request, "param", {})).start()
    yield ep
    ep.stop()


def _connect(ep: MetricsEndpoint) -> socket.socket:
    return socket.create_connection(("127.0.0.1", ep.port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (TimeoutError if it keeps the connection open)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _get(ep: MetricsEndpoint, request: bytes = REQUEST) -> bytes:
    with _connect(ep) as sock:
        sock.sendall(request)
        return _read_all(sock)


def _until_served(ep: MetricsEndpoint) -> bytes:
    """``GET /`` again until it is served, not refused as over the connection cap."""
    deadline = time.monotonic() + 10
    while b"too many connections" in (reply := _get(ep)) and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    return reply


@pytest.mark.parametrize("endpoint", [{"request_timeout_s": 0.5}], indirect=True)
def test_a_silent_client_is_disconnected(endpoint: MetricsEndpoint) -> None:
    with _connect(endpoint) as sock:
        assert _read_all(sock) == b""  # closed by the server, not left to hold its thread


@pytest.mark.parametrize("endpoint", [{"request_timeout_s": 0.5}], indirect=True)
def test_a_request_trickled_byte_by_byte_is_cut_off(endpoint: MetricsEndpoint) -> None:
    request = b"GET / HTTP/1.0\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n"
    sent = 0
    with _connect(endpoint) as sock:
        try:
            # Bytes come faster than the timeout: only a deadline on the whole request ends it.
            while sent < len(request) and not select.select([sock], [], [], 0.1)[0]:
                sock.send(request[sent : sent + 1])
                sent += 1
            reply = _read_all(sock)
        except ConnectionError:
            reply = b""
    assert sent < len(request) and reply == b""


@pytest.mark.parametrize("endpoint", [{"max_connections": 3, "request_timeout_s": 60}], indirect=True)
def test_idle_connections_are_capped_and_others_still_served(endpoint: MetricsEndpoint) -> None:
    # Connections are accepted in order and each takes its slot as it is accepted: these three hold
    # every slot before the fourth is looked at (a served request's slot may come back only after
    # its client has read the reply, so none is served first).
    idle = [_connect(endpoint) for _ in range(3)]
    try:
        with _connect(endpoint) as over:
            busy = _read_all(over)
        assert busy.startswith(b"HTTP/1.0 503 ") and b"too many connections" in busy
        idle.pop().close()  # frees its slot once its handler sees the close
        reply = _until_served(endpoint)  # two stuck clients do not hold up a third
        assert reply.startswith(b"HTTP/1.0 200 ") and b"GET /metrics" in reply
        assert b"Server: lmcache-metrics\r\n" in reply  # no Python version on show
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("endpoint", [{"max_connections": 1}], indirect=True)
def test_clients_that_hang_up_log_no_error(
    endpoint: MetricsEndpoint, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="lmcache")
    for request in (b"GET /metrics HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.0\r\nX-Half: "):
        for _ in range(3):
            sock = _connect(endpoint)
            sock.sendall(request)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, as a scraper giving up after its timeout does
            _until_served(endpoint)  # with one slot: that connection's handler has finished
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in capfd.readouterr().err


def test_a_failing_reply_names_no_detail(
    endpoint: MetricsEndpoint, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply that fails is a 500 whose body carries nothing of the exception; the log has it."""

    def failing() -> tuple[bool, dict]:
        raise RuntimeError("redis://:hunter2@10.0.0.5 unreachable")

    monkeypatch.setattr(endpoint, "health", failing)
    with caplog.at_level(logging.ERROR, logger="lmcache"):
        reply = _get(endpoint, b"GET /health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 500") and b"internal error" in reply
    assert b"hunter2" not in reply and b"RuntimeError" not in reply
    assert "hunter2" in caplog.text
