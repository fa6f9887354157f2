"""The latency fast paths: the client's direct lane and the server answering lookups on its I/O thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import zmq
from support.server_process import MODEL, TPB, ServerProcess, server_secret, shared_pool, wait_until

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient, ServerError, ServerUnavailable
from lmcache.server.server import CacheServer
from lmcache.transfer import BlockTransfer


def _warm_direct(client: CacheServerClient) -> None:
    """Ping until the direct lane is open and carries calls."""
    start = client.direct_calls
    wait_until(lambda: client.ping() and client.direct_calls > start, "a call on the direct lane")


def _read_frame(conn: socket.socket) -> bytes | None:
    """One frame of a direct connection (blocking), or None once the peer closed it."""
    header = conn.recv(P.DIRECT_HEADER.size, socket.MSG_WAITALL)
    if len(header) < P.DIRECT_HEADER.size:
        return None
    (size,) = P.DIRECT_HEADER.unpack(header)
    return conn.recv(size, socket.MSG_WAITALL) if size else b""


def _frame(payload: bytes) -> bytes:
    return P.DIRECT_HEADER.pack(len(payload)) + payload


class FakeServer:
    """A ROUTER plus a direct lane on TCP that answer pings; the test takes other requests itself."""

    def __init__(self, server_id: str = "fake") -> None:
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.url = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.info = P.PingInfo(
            server_id=server_id,
            protocol_version=P.PROTOCOL_VERSION,
            chunk_size=32,
            uptime_s=0,
            direct=P.DirectLane(port=self.listener.getsockname()[1]),
        )

    def next_request(self, timeout_ms: int) -> tuple[bytes | socket.socket, P.Request] | None:
        """The next request: from the ROUTER (with its routing id) or a direct connection (its socket)."""
        poller = zmq.Poller()
        for what in (self.router, self.listener, *self.conns):
            poller.register(what, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self.router in ready:
            identity, frame = self.router.recv_multipart()
            return identity, P.decode_request(frame)
        if self.listener.fileno() in ready:
            self.conns.append(self.listener.accept()[0])
        for conn in self.conns:
            if conn.fileno() in ready:
                frame = _read_frame(conn)
                if frame is not None:
                    return conn, P.decode_request(frame)
                self.conns.remove(conn)
                conn.close()
        return None

    def reply(self, to: bytes | socket.socket, rid: int, value: object) -> None:
        frame = P.encode(P.Reply(rid=rid, ok=True, value=value))
        if isinstance(to, bytes):
            self.router.send_multipart([to, frame])
        else:
            with contextlib.suppress(OSError):  # the client may have closed it (a late reply)
                to.sendall(_frame(frame))

    def serve_pings_until_other(self, timeout_s: float = 20.0) -> tuple[bytes | socket.socket, P.Request]:
        """Answer pings; return the first other request (its sender, the request) unanswered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.next_request(100)
            if got is None:
                continue
            to, req = got
            if not isinstance(req, P.Ping):
                return to, req
            self.reply(to, req.rid, self.info)
        raise AssertionError("the client sent nothing but pings")

    def serve_in_thread(self, stop: threading.Event) -> threading.Thread:
        """Answer pings with this server's info and every other request with 7, until ``stop``."""

        def loop() -> None:
            while not stop.is_set():
                got = self.next_request(20)
                if got is not None:
                    to, req = got
                    self.reply(to, req.rid, self.info if isinstance(req, P.Ping) else 7)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.router.close(0)
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


# ---- client: the direct lane ------------------------------------------------------------------------


def test_calls_take_the_direct_lane_once_connected(client: CacheServerClient) -> None:
    client.register(shared_pool(seed=90), 0, 1, MODEL, TPB, pool_sharing="export")
    tokens = list(range(90_000, 90_064))
    assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
    _warm_direct(client)
    before = client.direct_calls
    for _ in range(20):
        assert client.lookup(tokens) == 64
    assert client.lookup(tokens, pin_id="p") == 64
    assert client.release("p") is True
    assert client.direct_calls == before + 22
    with client.direct.hold():  # the direct lane is busy (another thread's call): the I/O thread serves
        assert client.lookup(tokens) == 64
    assert client.direct_calls == before + 22


def test_concurrent_callers_share_the_two_paths(client: CacheServerClient) -> None:
    """Threads that find the direct lane busy go through the I/O thread; all get their own replies."""
    client.register(shared_pool(seed=91), 0, 1, MODEL, TPB, pool_sharing="export")
    prompts = [list(range(91_000 + 1000 * i, 91_000 + 1000 * i + 32 * (i + 1))) for i in range(4)]
    for i, tokens in enumerate(prompts):
        assert client.store(BlockTransfer(tokens, None, list(range(4 * (i + 1))), 0, len(tokens))) == len(
            tokens
        )
    _warm_direct(client)
    errors: list[BaseException] = []
    start = client.direct_calls

    def work(i: int) -> None:
        try:
            for _ in range(50):
                assert client.lookup(prompts[i]) == len(prompts[i])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert client.direct_calls > start


def test_direct_timeout_never_delivers_the_late_reply(fake: FakeServer) -> None:
    client = CacheServerClient(fake.url, timeout_s=0.5, heartbeat_interval_s=0)
    stop = threading.Event()
    try:
        warming = threading.Event()
        warm = fake.serve_in_thread(warming)
        _warm_direct(client)
        warming.set()
        warm.join(30)
        result: list[object] = []

        def lookup() -> None:
            try:
                result.append(client.lookup([1, 2, 3], instance_id=5))
            except BaseException as e:  # noqa: BLE001
                result.append(e)

        caller = threading.Thread(target=lookup)
        caller.start()
        to, req = fake.serve_pings_until_other()
        assert isinstance(req, P.Lookup) and isinstance(to, socket.socket)  # on the direct lane
        caller.join(30)
        assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
        assert "within 0.5 s" in str(result[0])
        fake.reply(to, req.rid, 999)  # too late: the client closed that connection
        direct = client.direct_calls
        thread = fake.serve_in_thread(stop)
        # Calls work again once the connection is seen up, and never see the late 999.
        assert wait_until(lambda: _lookup_or_none(client), "the client to reconnect") == 7
        for _ in range(20):
            assert client.lookup([1, 2, 3], instance_id=5) == 7
        wait_until(
            lambda: client.lookup([1], instance_id=5) == 7 and client.direct_calls > direct,
            "the direct lane again",
        )
        stop.set()
        thread.join(30)
    finally:
        stop.set()
        client.close(unregister=False)


def _lookup_or_none(client: CacheServerClient) -> int | None:
    try:
        return client.lookup([1, 2, 3], instance_id=5)
    except ServerUnavailable:
        return None


def test_direct_call_fails_at_once_when_the_connection_drops(fake: FakeServer) -> None:
    client = CacheServerClient(fake.url, timeout_s=60.0, heartbeat_interval_s=0)
    result: list[object] = []
    try:
        stop = threading.Event()
        thread = fake.serve_in_thread(stop)
        _warm_direct(client)
        stop.set()
        thread.join(30)

        def ping() -> None:
            try:
                result.append(client.ping())
            except BaseException as e:  # noqa: BLE001
                result.append(e)

        caller = threading.Thread(target=ping)
        caller.start()
        to, _ = _take_any(fake)
        assert isinstance(to, socket.socket)
        fake.close()  # taken, never answered
        caller.join(30)  # far below the 60 s timeout
        assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
        assert "connection to the server lost" in str(result[0])
    finally:
        client.close(unregister=False)


def _take_any(fake: FakeServer) -> tuple[bytes | socket.socket, P.Request]:
    """The next request, whatever it is, unanswered."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = fake.next_request(100)
        if got is not None:
            return got
    raise AssertionError("the client sent nothing")


def test_close_wakes_a_direct_call_in_flight(fake: FakeServer) -> None:
    client = CacheServerClient(fake.url, timeout_s=60.0, heartbeat_interval_s=0)
    stop = threading.Event()
    thread = fake.serve_in_thread(stop)
    _warm_direct(client)
    stop.set()
    thread.join(30)
    result: list[object] = []

    def ping() -> None:
        try:
            result.append(client.ping())
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    caller = threading.Thread(target=ping)
    caller.start()
    assert isinstance(_take_any(fake)[0], socket.socket)  # never answered
    client.close(unregister=False)
    caller.join(30)
    assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
    with pytest.raises(ServerUnavailable, match="closed"):
        client.ping()


def test_a_lane_answered_by_another_server_is_not_used() -> None:
    """The lane's ping must come from the server that advertised it (not a successor, not another
    program on a reused port); until then every call takes the I/O thread's path."""
    fake, impostor = FakeServer("fake"), FakeServer("impostor")
    fake.info.direct = impostor.info.direct
    stops = [threading.Event(), threading.Event()]
    threads = [fake.serve_in_thread(stops[0]), impostor.serve_in_thread(stops[1])]
    client = CacheServerClient(fake.url, timeout_s=20.0, heartbeat_interval_s=0)
    try:
        for _ in range(20):
            assert client.ping().server_id == "fake"
        assert client.lookup([1], instance_id=5) == 7
        assert client.direct_calls == 0
    finally:
        client.close(unregister=False)
        for stop, thread in zip(stops, threads, strict=True):
            stop.set()
            thread.join(30)
        fake.close()
        impostor.close()


def test_oversized_request_gets_its_error_not_a_timeout(client: CacheServerClient) -> None:
    client.register(shared_pool(seed=92), 0, 1, MODEL, TPB, pool_sharing="export")
    # The module's server takes frames of up to 1 MiB; its answer names our request id. (A lookup for
    # an instance this client did not register carries its tokens, not their much shorter hashes.)
    with pytest.raises(ServerError) as info:
        client.lookup(list(range(200_000)), instance_id=1, timeout_s=20.0)
    assert info.value.code == P.ErrorCode.TOO_LARGE.value


def test_protocol_error_for_oversized_frame_carries_the_rid() -> None:
    frame = P.encode(P.Lookup(rid=41, instance_id=1, tokens=b"\0" * 800))
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(frame, max_bytes=100)
    assert info.value.code == P.ErrorCode.TOO_LARGE and info.value.rid == 41


# ---- server: lookups and releases on the I/O thread ----------------------------------------------


def test_lookup_and_release_run_on_the_io_thread_unless_queued_behind_work(
    inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = inproc_server.engine
    threads: dict[str, list[int]] = {"lookup": [], "release": []}
    real_lookup, real_lookup_hashes = engine.lookup, engine.lookup_hashes
    real_release, real_store = engine.release, engine.store
    store_entered, store_go = threading.Event(), threading.Event()
    store_go.set()

    def lookup(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads["lookup"].append(threading.get_ident())
        return real_lookup(*args, **kwargs)

    def lookup_hashes(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads["lookup"].append(threading.get_ident())
        return real_lookup_hashes(*args, **kwargs)

    def release(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads["release"].append(threading.get_ident())
        return real_release(*args, **kwargs)

    def store(*args, **kwargs):  # type: ignore[no-untyped-def]
        store_entered.set()
        assert store_go.wait(30)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(engine, "lookup", lookup)
    monkeypatch.setattr(engine, "lookup_hashes", lookup_hashes)
    monkeypatch.setattr(engine, "release", release)
    monkeypatch.setattr(engine, "store", store)
    client = CacheServerClient(f"tcp://127.0.0.1:{inproc_server.tcp_port}", timeout_s=20.0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"pipelined")
    sock.connect(f"tcp://127.0.0.1:{inproc_server.tcp_port}")
    try:
        cred = {
            "auth": server_secret(),
            "cap": client.register(shared_pool(seed=93), 0, 1, MODEL, TPB, pool_sharing="export").cap,
        }
        iid = client.instance_id
        tokens = list(range(93_000, 93_064))
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
        assert client.lookup(tokens, pin_id="a") == 64
        assert client.release("a") is True
        io = inproc_server.io_thread
        assert threads["lookup"] == [io] and io in threads["release"]

        # A lookup pipelined behind a (stalled) store of the same connection waits for it, on a worker.
        threads["lookup"].clear()
        store_go.clear()
        store_entered.clear()
        other = P.tokens_to_bytes(list(range(94_000, 94_064)))
        sock.send(
            P.encode(
                P.Store(rid=1, instance_id=iid, tokens=other, block_ids=list(range(8, 16)), end=64, **cred)
            )
        )
        assert store_entered.wait(20)
        sock.send(P.encode(P.Lookup(rid=2, instance_id=iid, tokens=other, **cred)))
        # meanwhile another connection's lookup is answered on the I/O thread
        assert client.lookup(tokens) == 64
        assert threads["lookup"] == [io]
        # The store may go on only once the server holds the lookup behind it: else the lookup could
        # arrive after the store finished and rightly run inline (this test's own race, not the server's).
        wait_until(
            lambda: inproc_server.dispatcher.waiting(b"pipelined") == 1, "the lookup queued behind the store"
        )
        store_go.set()
        replies = {}
        for _ in range(2):
            assert sock.poll(20_000)
            reply = P.decode_reply(sock.recv())
            replies[reply.rid] = reply.value
        assert replies == {1: 64, 2: 64}  # the lookup saw the store before it
        assert len(threads["lookup"]) == 2 and threads["lookup"][1] != io
    finally:
        store_go.set()
        sock.close(0)
        client.close()


def test_long_lookups_go_to_the_workers(inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache.server import dispatch

    monkeypatch.setattr(dispatch, "INLINE_LOOKUP_MAX_TOKENS", 16)
    seen: list[int] = []
    real_lookup_hashes = inproc_server.engine.lookup_hashes

    def lookup_hashes(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(threading.get_ident())
        return real_lookup_hashes(*args, **kwargs)

    monkeypatch.setattr(inproc_server.engine, "lookup_hashes", lookup_hashes)
    with CacheServerClient(f"tcp://127.0.0.1:{inproc_server.tcp_port}", timeout_s=20.0) as client:
        client.register(shared_pool(seed=94), 0, 1, MODEL, TPB, pool_sharing="export")
        assert client.lookup(list(range(16))) == 0
        assert client.lookup(list(range(64))) == 0
    assert seen[0] == inproc_server.io_thread and seen[1] != inproc_server.io_thread


def test_server_process_serves_lookups_over_both_transports(server: ServerProcess) -> None:
    pool = shared_pool(seed=95)
    tokens = list(range(95_000, 95_064))
    for url in (server.ipc_url, server.tcp_url):
        with CacheServerClient(url, timeout_s=20.0) as c:
            c.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
            c.store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
            _warm_direct(c)
            assert c.lookup(tokens) == 64


def test_direct_lane_reads_frames_however_they_are_cut(server: ServerProcess) -> None:
    pings = [_frame(P.encode(P.Ping(rid=rid))) for rid in range(1, 5)]
    oversized = P.encode(P.Lookup(rid=5, instance_id=1, tokens=b"\0" * (2 << 20)))  # over its 1 MiB cap
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(20)
        conn.connect(server.ipc_path + ".direct")
        conn.sendall(pings[0] + pings[1] + pings[2][:3])  # two frames and a bit in one write
        time.sleep(0.05)
        conn.sendall(pings[2][3:] + pings[3])
        replies = [P.decode_reply(_read_frame(conn) or b"") for _ in range(4)]
        assert [r.rid for r in replies] == [1, 2, 3, 4] and all(r.ok for r in replies)
        conn.sendall(_frame(oversized))
        reply = P.decode_reply(_read_frame(conn) or b"")
        assert reply.rid == 5 and reply.error is not None and reply.error.code == "too_large"
        conn.sendall(P.DIRECT_HEADER.pack(1 << 31))  # announces more than the hard cap: dropped
        assert _read_frame(conn) is None
    with CacheServerClient(server.tcp_url) as client:
        lane = client.ping().direct
    assert lane is not None and lane.ipc_name == "s.sock.direct"
    with socket.create_connection(("127.0.0.1", lane.port)) as conn:
        conn.sendall(pings[0])
        assert P.decode_reply(_read_frame(conn) or b"").rid == 1
