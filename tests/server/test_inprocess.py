"""Server threading model, with the server in a thread of this process (so the engine can be slowed)."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import torch
from raw_lane import connect, framed, read_reply
from support.server_process import MODEL, TPB, server_secret, shared_pool

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient, ServerUnavailable
from lmcache.server.security import Peer
from lmcache.server.server import CacheServer, ServerConfig
from lmcache.server.transport import Connection
from lmcache.transfer import BlockTransfer


def _url(server: CacheServer) -> str:
    return f"tcp://127.0.0.1:{server.tcp_port}"


def test_requests_of_one_client_run_in_order(inproc_server: CacheServer) -> None:
    """A pipelined store then lookup on one connection: the lookup always sees the store."""
    client = CacheServerClient(_url(inproc_server), timeout_s=20.0)
    pool = shared_pool(seed=1)
    cred = {
        "auth": server_secret(),
        "cap": client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export").cap,
    }
    iid = client.instance_id
    sock = connect(_url(inproc_server))
    try:
        for round_ in range(20):
            tok = P.tokens_to_bytes(list(range(round_ * 1000, round_ * 1000 + 64)))
            store = P.Store(
                rid=2 * round_, instance_id=iid, tokens=tok, block_ids=list(range(8)), end=64, **cred
            )
            lookup = P.Lookup(rid=2 * round_ + 1, instance_id=iid, tokens=tok, **cred)
            sock.sendall(framed(P.encode(store)) + framed(P.encode(lookup)))  # pipelined
            replies = {}
            for _ in range(2):
                reply = read_reply(sock)
                replies[reply.rid] = reply
            assert replies[2 * round_].value == 64
            assert replies[2 * round_ + 1].value == 64
    finally:
        sock.close()
        client.close()


def test_a_slow_client_does_not_block_others(
    inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = inproc_server.engine
    entered, release = threading.Event(), threading.Event()
    real_store = engine.store

    def slow_store(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(30)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(engine, "store", slow_store)
    slow, fast = (CacheServerClient(_url(inproc_server), timeout_s=20.0) for _ in range(2))
    try:
        slow.register(shared_pool(seed=2), 0, 1, MODEL, TPB, pool_sharing="export")
        fast.register(shared_pool(seed=3), 0, 1, MODEL, TPB, pool_sharing="export")
        tokens = list(range(64))
        result: list[int] = []
        worker = threading.Thread(
            target=lambda: result.append(slow.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)))
        )
        worker.start()
        assert entered.wait(20)
        # While the slow client's store is stuck in the engine, another client is served.
        assert fast.lookup(tokens) == 0
        assert fast.ping().server_id == inproc_server.server_id
        release.set()
        worker.join(30)
        assert result == [64]
        assert fast.lookup(tokens) == 64
    finally:
        release.set()
        slow.close()
        fast.close()


def test_reap_releases_mapping_and_pins_but_keeps_chunks(inproc_server: CacheServer) -> None:
    client = CacheServerClient(_url(inproc_server), timeout_s=20.0, heartbeat_interval_s=0)
    try:
        pool = shared_pool(seed=4)
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
        tokens = list(range(500, 564))
        client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
        assert client.lookup(tokens, pin_id="x") == 64
        inst = inproc_server.service.instances.get(client.instance_id)
        assert inst is not None
        inproc_server.config.client_timeout_s = 5.0
        inproc_server.reap(now=inst.last_seen + 10.0)
        assert client.instance_id not in inproc_server.service.instances
        assert inst.pool.closed
        assert inproc_server.stats().pinned_lookups == 0
        assert inproc_server.engine.pinned_ids() == []
        # the client re-registers by itself and the chunks are still there
        assert client.lookup(tokens) == 64
        assert client.reregistrations == 1
        pool[20:28].zero_()
        assert client.retrieve(BlockTransfer(tokens, None, list(range(20, 28)), 0, 64)) == 64
        assert torch.equal(pool[20:28], pool[:8])
    finally:
        client.close()


def test_stale_pins_expire(inproc_server: CacheServer) -> None:
    client = CacheServerClient(_url(inproc_server), timeout_s=20.0)
    try:
        client.register(shared_pool(seed=5), 0, 1, MODEL, TPB, pool_sharing="export")
        tokens = list(range(900, 964))
        client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
        assert client.lookup(tokens, pin_id=1) == 64
        assert client.lookup(list(range(5)), pin_id=2) == 0  # a miss pins nothing
        client.stats()  # a claimed lookup pins one-way: a call after it is served after it
        assert inproc_server.stats().pinned_lookups == 1
        pinned = inproc_server.service.pins.get((client.instance_id, 1))
        assert pinned is not None
        inproc_server.reap(now=pinned.created + 10_000)
        assert inproc_server.stats().pinned_lookups == 0
        assert inproc_server.engine.pinned_ids() == []
    finally:
        client.close()


def test_lost_connection_fails_inflight_requests_without_waiting_for_the_timeout() -> None:
    """A server that takes a request and dies: the caller gets ServerUnavailable naming the lost
    connection (not the 60 s timeout)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = CacheServerClient(f"tcp://127.0.0.1:{port}", timeout_s=60.0, heartbeat_interval_s=0)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.ping()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    caller = threading.Thread(target=call)
    try:
        caller.start()
        listener.settimeout(20)
        conn, _ = listener.accept()
        conn.settimeout(20)
        assert conn.recv(1 << 16)  # taken, never answered
        conn.close()
        listener.close()
        caller.join(60)
        assert len(errors) == 1
        assert isinstance(errors[0], ServerUnavailable)
        assert "connection to the server lost" in str(errors[0])
    finally:
        client.close(unregister=False)


def _raw_lookup(sock: socket.socket, req: P.LookupHashes | P.Lookup) -> P.Reply:
    sock.sendall(framed(P.encode(req)))
    return read_reply(sock)


def test_lookups_send_chunk_hashes_that_agree_with_tokens(
    inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = inproc_server.engine
    by_hashes: list[int] = []
    real_lookup_hashes = engine.lookup_hashes

    def lookup_hashes(*args, **kwargs):  # type: ignore[no-untyped-def]
        by_hashes.append(1)
        return real_lookup_hashes(*args, **kwargs)

    monkeypatch.setattr(engine, "lookup_hashes", lookup_hashes)
    clients = [CacheServerClient(_url(inproc_server), timeout_s=20.0) for _ in range(2)]
    sock = connect(_url(inproc_server))
    try:
        pools = [shared_pool(seed=6 + rank) for rank in range(2)]
        infos = [
            c.register(pools[rank], rank, 2, MODEL, TPB, pool_sharing="export")
            for rank, c in enumerate(clients)
        ]
        assert all(info.hashing is not None and info.hashing.algorithm == "blake3" for info in infos)
        owner, tokens = clients[0].instance_id, list(range(3000, 3100))  # 3 chunks + 4 tokens
        cred = {"auth": server_secret(), "cap": infos[0].cap}
        for c in clients:
            c.store(BlockTransfer(tokens, "s", list(range(13)), 0, 96 if c is clients[0] else 64))
        for salt, expected in (("s", 64), (None, 0)):
            by_tokens = _raw_lookup(
                sock, P.Lookup(instance_id=owner, tokens=P.tokens_to_bytes(tokens), cache_salt=salt, **cred)
            )
            assert by_tokens.value == expected
            assert clients[0].lookup(tokens, salt) == expected  # both ranks, as by tokens
        assert clients[0].lookup(tokens, "s", pin_id=9) == 64
        clients[0].stats()  # the claimed lookup pins one-way: a call after it is served after it
        assert len(engine.l1.pinned_keys()) == 4  # 2 chunks x 2 ranks
        assert clients[0].release(9) is True
        assert engine.l1.pinned_keys() == [] and len(by_hashes) == 3
        inst = inproc_server.service.instances.get(owner)
        assert inst is not None
        digests = b"".join(engine.hasher(inst.space).chunk_hashes(tokens, "s"))
        reply = _raw_lookup(
            sock, P.LookupHashes(instance_id=owner, chunk_hashes=digests[:-1], num_tokens=100, **cred)
        )
        assert reply.error is not None and reply.error.code == "invalid"
        assert "95 bytes is not a whole number of 32-byte digests" in reply.error.message
        reply = _raw_lookup(
            sock, P.LookupHashes(instance_id=owner, chunk_hashes=digests, num_tokens=64, **cred)
        )
        assert reply.error is not None and "3 chunk hashes for 64 tokens" in reply.error.message
        reply = _raw_lookup(
            sock, P.LookupHashes(instance_id=owner, chunk_hashes=digests, num_tokens=100, **cred)
        )
        assert reply.value == 64
    finally:
        sock.close()
        for c in clients:
            c.close()


def test_with_save_unfull_chunk_lookups_carry_tokens(inproc_server: CacheServer) -> None:
    inproc_server.engine.config.save_unfull_chunk = True  # partial chunks are probed by their tokens
    with CacheServerClient(_url(inproc_server), timeout_s=20.0) as client:
        assert client.register(shared_pool(seed=8), 0, 1, MODEL, TPB, pool_sharing="export").hashing is None
        tokens = list(range(4000, 4044))  # 1 chunk + 12 tokens: a tail of one 8-token block
        assert client.store(BlockTransfer(tokens, None, list(range(6)), 0, 44)) == 40
        assert client.lookup(tokens) == 40


def test_io_thread_busy_polls_after_a_request_but_never_beside_running_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=256, max_local_cpu_size=0.01), pinned=False
    )
    server = CacheServer(engine, ServerConfig(port=0, ipc_path=None, busy_poll_s=60.0))
    idle = CacheServer(engine, ServerConfig(port=0, ipc_path=None, busy_poll_s=0.0))
    entered, go = threading.Event(), threading.Event()
    real_clear = engine.clear

    def slow_clear() -> int:
        entered.set()
        assert go.wait(30)
        return real_clear()

    monkeypatch.setattr(engine, "clear", slow_clear)
    try:
        assert server.transport.poll_timeout_ms() > 0  # idle since start: sleep in poll
        for s in (server, idle):
            s.dispatcher.on_frames([(1, P.encode(P.Ping(rid=1)), Peer())])
        assert server.transport.poll_timeout_ms() == 0
        assert idle.transport.poll_timeout_ms() > 0
        # a worker runs a request (clear, an operator's, held in the engine): the GIL is theirs
        server.dispatcher.on_frames([(2, P.encode(P.Clear(rid=2)), Peer(uid=os.geteuid()))])
        assert entered.wait(20)
        assert server.transport.poll_timeout_ms() > 0
    finally:
        go.set()
        server.close()
        idle.close()


def test_a_worker_sends_a_reply_itself_only_when_nothing_waits_before_it() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    conn = Connection(ours, 1, Peer(), 0.0)
    try:
        assert conn.send_from_worker(b"small") is True
        assert peer.recv(16) == b"small"
        big = b"x" * (16 << 20)  # more than the socket buffers hold: part goes, the rest waits
        assert conn.send_from_worker(big) is None
        assert 0 < len(conn.outbox) < len(big)
        assert conn.send_from_worker(b"later") is False  # would overtake what waits in outbox
        conn.outbox.clear()
        conn.closed = True
        assert conn.send_from_worker(b"late") is False  # never onto a closed (reusable) descriptor
    finally:
        ours.close()
        peer.close()


def test_a_reregistration_waiting_for_the_server_holds_up_no_other_call(
    inproc_server: CacheServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a re-registration waits for the server, the client's bookkeeping (a lookup's claims and
    pins, its misses) goes on, and a call refused meanwhile for the old capability retries with the new
    one instead of registering a second time."""
    client = CacheServerClient(_url(inproc_server), timeout_s=20.0, heartbeat_interval_s=0)
    try:
        client.register(shared_pool(seed=5), 0, 1, MODEL, TPB, pool_sharing="export")
        iid = client.instance_id
        assert iid is not None
        tokens = list(range(700, 764))
        client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
        inst = inproc_server.service.instances.get(iid)
        assert inst is not None
        inproc_server.config.client_timeout_s = 5.0
        inproc_server.reap(now=inst.last_seen + 10.0)  # the server forgets the instance
        entered, release = threading.Event(), threading.Event()
        real_hasher = inproc_server.engine.hasher

        def slow_hasher(*args, **kwargs):  # type: ignore[no-untyped-def]
            entered.set()  # registering: checks the layout's chunk size
            assert release.wait(30)
            return real_hasher(*args, **kwargs)

        monkeypatch.setattr(inproc_server.engine, "hasher", slow_hasher)
        beat = threading.Thread(target=client.heartbeat)  # finds the instance unknown: re-registers
        beat.start()
        assert entered.wait(20)
        bookkeeping = threading.Thread(
            target=lambda: (client.registrations.count_miss(64), client.registrations.unpinned(iid, "p"))
        )
        bookkeeping.start()
        bookkeeping.join(10)
        held_up = bookkeeping.is_alive()
        errors = inproc_server.stats().errors
        found: list[int] = []
        lookup = threading.Thread(target=lambda: found.append(client.lookup(tokens)))
        lookup.start()  # refused for the capability the server forgot, while the re-registration waits
        while inproc_server.stats().errors == errors and lookup.is_alive():
            release.wait(0.01)
        release.set()
        for thread in (beat, bookkeeping, lookup):
            thread.join(30)
        assert not held_up
        assert found == [64]
        assert client.reregistrations == 1
    finally:
        release.set()
        client.close()
