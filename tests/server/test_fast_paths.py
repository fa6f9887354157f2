"""The latency fast paths: calls waited for in the calling thread on the client's lanes, and the
server answering lookups on its I/O thread."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from raw_lane import connect, framed, read_frame, read_reply
from support.server_process import MODEL, TPB, ServerProcess, server_secret, shared_pool, wait_until

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient, ServerError, ServerUnavailable
from lmcache.server.server import CacheServer
from lmcache.transfer import BlockTransfer


class FakeServer:
    """A TCP listener answering pings; the test takes other requests itself."""

    def __init__(self, server_id: str = "fake") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.info = P.PingInfo(
            server_id=server_id, protocol_version=P.PROTOCOL_VERSION, chunk_size=32, uptime_s=0
        )

    def next_request(self, timeout_ms: int) -> tuple[socket.socket, P.Request] | None:
        """The next request and the connection it came on."""
        poll = select.poll()
        for what in (self.listener, *self.conns):
            poll.register(what, select.POLLIN)
        ready = {fd for fd, _ in poll.poll(timeout_ms)}
        if self.listener.fileno() in ready:
            self.conns.append(self.listener.accept()[0])
        for conn in list(self.conns):
            if conn.fileno() in ready:
                frame = read_frame(conn)
                if frame is not None:
                    return conn, P.decode_request(frame)
                self.conns.remove(conn)
                conn.close()
        return None

    def reply(self, to: socket.socket, rid: int, value: object) -> None:
        with contextlib.suppress(OSError):  # the client may have closed it (a late reply)
            to.sendall(framed(P.encode(P.Reply(rid=rid, ok=True, value=value))))

    def take_other(self, timeout_s: float = 20.0) -> tuple[socket.socket, P.Request]:
        """Answer pings; return the first other request (its connection, the request) unanswered."""
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
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def _in_thread(call) -> tuple[threading.Thread, list[object]]:  # type: ignore[no-untyped-def]
    """Run ``call`` on a thread; its result or exception lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


# ---- client: the lanes ------------------------------------------------------------------------------


def test_calls_of_one_thread_share_a_lane_and_a_busy_lane_means_another(server: ServerProcess) -> None:
    with CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0) as client:
        client.register(shared_pool(seed=90), 0, 1, MODEL, TPB, pool_sharing="export")
        tokens = list(range(90_000, 90_064))
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
        before = client.lanes.calls
        for _ in range(20):
            assert client.lookup(tokens) == 64
        assert client.lookup(tokens, pin_id="p") == 64
        assert client.release("p") is True
        # The pinned lookup is claimed through shared memory and sent one-way: no call waits for it.
        assert client.lanes.calls == before + 21 and client.lanes.opened == 1 and client.lanes.lanes == 1
        with client.lanes.hold():  # the lane is busy (another thread's call): a second one opens
            assert client.lookup(tokens) == 64
        assert client.lanes.opened == 2 and client.lanes.lanes == 2


def test_concurrent_callers_run_on_their_own_lanes(client: CacheServerClient) -> None:
    client.register(shared_pool(seed=91), 0, 1, MODEL, TPB, pool_sharing="export")
    prompts = [list(range(91_000 + 1000 * i, 91_000 + 1000 * i + 32 * (i + 1))) for i in range(6)]
    for i, tokens in enumerate(prompts):
        assert client.store(BlockTransfer(tokens, None, list(range(4 * (i + 1))), 0, len(tokens))) == len(
            tokens
        )
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(50):
                assert client.lookup(prompts[i]) == len(prompts[i])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]  # more threads than lanes
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert client.lanes.lanes <= client.lanes.size


def test_a_full_pool_makes_a_call_wait_for_a_lane(server: ServerProcess) -> None:
    with CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0, lanes=1) as client:
        assert client.ping().server_id
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with client.lanes.hold():
                held.set()
                assert release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(30)
        caller, result = _in_thread(client.ping)
        wait_until(lambda: client.lanes.waiters == 1, "the ping to wait for the only lane")
        assert not result
        release.set()
        caller.join(30)
        holder.join(30)
        assert len(result) == 1 and isinstance(result[0], P.PingInfo), result
        assert client.lanes.opened == 1
        with client.lanes.hold(), pytest.raises(ServerUnavailable, match="no lane came free within 0.2 s"):
            client.ping(timeout_s=0.2)


def test_timeout_never_delivers_the_late_reply(fake: FakeServer) -> None:
    client = CacheServerClient(fake.url, timeout_s=0.5, heartbeat_interval_s=0)
    stop = threading.Event()
    try:
        caller, result = _in_thread(lambda: client.lookup([1, 2, 3], instance_id=5))
        to, req = fake.take_other()
        assert isinstance(req, P.Lookup)
        caller.join(30)
        assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
        assert "within 0.5 s" in str(result[0])
        fake.reply(to, req.rid, 999)  # too late: the client closed that connection
        thread = fake.serve_in_thread(stop)
        # Calls work again on a new lane, and never see the late 999.
        for _ in range(20):
            assert client.lookup([1, 2, 3], instance_id=5) == 7
        assert client.lanes.opened == 2
        stop.set()
        thread.join(30)
    finally:
        stop.set()
        client.close(unregister=False)


def test_a_lane_broken_mid_call_fails_that_call_at_once_and_is_replaced(fake: FakeServer) -> None:
    client = CacheServerClient(fake.url, timeout_s=60.0, heartbeat_interval_s=0)
    stop = threading.Event()
    try:
        caller, result = _in_thread(client.stats)
        to, _ = fake.take_other()
        fake.conns.remove(to)
        to.close()  # taken, never answered
        caller.join(30)  # far below the 60 s timeout
        assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
        assert "connection to the server lost" in str(result[0])
        assert client.lanes.lanes == 0
        thread = fake.serve_in_thread(stop)
        assert client.lookup([1], instance_id=5) == 7  # on a new lane
        assert client.lanes.opened == 2 and client.lanes.lanes == 1
        stop.set()
        thread.join(30)
    finally:
        stop.set()
        client.close(unregister=False)


def test_close_wakes_a_call_in_flight(fake: FakeServer) -> None:
    client = CacheServerClient(fake.url, timeout_s=60.0, heartbeat_interval_s=0)
    caller, result = _in_thread(client.stats)
    fake.take_other()  # never answered
    client.close(unregister=False)
    caller.join(30)
    assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
    with pytest.raises(ServerUnavailable, match="closed"):
        client.ping()


def test_a_lookup_does_not_wait_behind_another_threads_store(
    inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = inproc_server.engine
    real_store = engine.store
    entered, go = threading.Event(), threading.Event()

    def store(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert go.wait(30)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(engine, "store", store)
    with CacheServerClient(f"tcp://127.0.0.1:{inproc_server.tcp_port}", timeout_s=20.0) as client:
        client.register(shared_pool(seed=96), 0, 1, MODEL, TPB, pool_sharing="export")
        tokens = list(range(96_000, 96_064))
        try:
            saver, result = _in_thread(
                lambda: client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
            )
            assert entered.wait(20)
            assert client.lookup(tokens) == 0  # answered while the store is still running
            assert not result
        finally:
            go.set()
        saver.join(30)
        assert result == [64]
        assert client.lookup(tokens) == 64


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
    sock = connect(f"tcp://127.0.0.1:{inproc_server.tcp_port}")
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
        sock.sendall(
            framed(
                P.encode(
                    P.Store(
                        rid=1, instance_id=iid, tokens=other, block_ids=list(range(8, 16)), end=64, **cred
                    )
                )
            )
        )
        assert store_entered.wait(20)
        sock.sendall(framed(P.encode(P.Lookup(rid=2, instance_id=iid, tokens=other, **cred))))
        # meanwhile another connection's lookup is answered on the I/O thread
        assert client.lookup(tokens) == 64
        assert threads["lookup"] == [io]
        # The store may go on only once the server holds the lookup behind it: else the lookup could
        # arrive after the store finished and rightly run inline (this test's own race, not the server's).
        wait_until(lambda: inproc_server.dispatcher.waiting() == 1, "the lookup queued behind the store")
        store_go.set()
        replies = {}
        for _ in range(2):
            reply = read_reply(sock)
            replies[reply.rid] = reply.value
        assert replies == {1: 64, 2: 64}  # the lookup saw the store before it
        assert len(threads["lookup"]) == 2 and threads["lookup"][1] != io
    finally:
        store_go.set()
        sock.close()
        client.close()


def test_long_lookups_go_to_the_workers(inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache.server import inline_cost

    monkeypatch.setattr(inline_cost, "INLINE_MAX_COST", 16)
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


def test_server_process_serves_lookups_over_both_urls(server: ServerProcess) -> None:
    pool = shared_pool(seed=95)
    tokens = list(range(95_000, 95_064))
    for url in (server.ipc_url, server.tcp_url):
        with CacheServerClient(url, timeout_s=20.0) as c:
            c.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
            c.store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
            assert c.lookup(tokens) == 64


def test_server_reads_frames_however_they_are_cut(server: ServerProcess) -> None:
    pings = [framed(P.encode(P.Ping(rid=rid))) for rid in range(1, 5)]
    oversized = P.encode(P.Lookup(rid=5, instance_id=1, tokens=b"\0" * (2 << 20)))  # over its 1 MiB cap
    with connect(server.ipc_url) as conn:
        conn.sendall(pings[0] + pings[1] + pings[2][:3])  # two frames and a bit in one write
        time.sleep(0.05)
        conn.sendall(pings[2][3:] + pings[3])
        replies = [read_reply(conn) for _ in range(4)]
        assert [r.rid for r in replies] == [1, 2, 3, 4] and all(r.ok for r in replies)
        conn.sendall(framed(oversized))
        reply = read_reply(conn)
        assert reply.rid == 5 and reply.error is not None and reply.error.code == "too_large"
        conn.sendall(P.FRAME_HEADER.pack(1 << 31))  # announces more than the hard cap: told, then dropped
        assert read_reply(conn).error.code == "too_large"  # type: ignore[union-attr]
        assert read_frame(conn) is None
    with connect(server.tcp_url) as conn:
        conn.sendall(pings[0])
        assert read_reply(conn).rid == 1
