"""The Redis tier under faults: passwords that need care, a busy connection pool, a full server and
a server that trickles its reply. Each is a miss at worst, never an outage nor a leaked secret."""

from __future__ import annotations

import logging
import socket
import threading

import numpy as np
import pytest
from fake_resp import FakeResp

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkKey
from lmcache.remote_url import mask_password, url_problem
from lmcache.storage.chunk_format import Namespace, encode_header
from lmcache.storage.lower_tier import FetchStatus
from lmcache.storage.remote_store import RemoteStore, parse_cluster_nodes

NS = Namespace("m", b"float32/L2/KV2/E128/T8")  # 2048-byte rows of 8 tokens
TOKENS = 32
PAYLOAD = 4 * 2048  # a chunk of 32 tokens


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(4, "little") * 8, 1, 0)


def item(i: int) -> tuple[Namespace, ChunkKey, tuple[bytes, memoryview]]:
    payload = memoryview(np.random.default_rng(i).integers(0, 256, PAYLOAD, dtype=np.uint8).tobytes())
    return NS, key(i), (encode_header(key(i), NS, TOKENS, payload), payload)


def into_buffers(got: list[bytearray]):  # type: ignore[no-untyped-def]
    def sink(index: int, payload_len: int, num_tokens: int) -> memoryview:
        got.append(bytearray(payload_len))
        return memoryview(got[-1])

    return sink


PASSWORD = "pa/ss?w#rd@x"  # each of '/', '?', '#' and '@' ends redis-py's user part early


def test_a_password_holding_url_delimiters_authenticates_and_is_never_shown(own_redis, caplog) -> None:  # type: ignore[no-untyped-def]
    server = own_redis("--user", "tester", "on", f">{PASSWORD}", "~*", "+@all")
    url = f"redis://tester:{PASSWORD}@127.0.0.1:{server.port}"
    assert url_problem(url) is None  # the config accepts it, so the client must read it the same way
    caplog.set_level(logging.INFO, logger="lmcache")
    store = RemoteStore.from_config(LMCacheEngineConfig.from_dict({"remote_url": url}))
    assert store is not None
    assert store.put_many([item(1)]) == 1
    assert store.exists_many(NS, [key(1)]) == [True]
    assert store.status().failures == 0
    unreachable = RemoteStore(f"redis://tester:{PASSWORD}@127.0.0.1:1")
    assert unreachable.exists_many(NS, [key(1)]) is None  # warns, naming the server
    assert "unavailable" in caplog.text
    for shown in (store.where, unreachable.where, caplog.text):
        assert "pa/ss" not in shown and "w#rd" not in shown
    assert store.where == f"redis://tester:***@127.0.0.1:{server.port}"
    store.close()


def test_cluster_urls_read_the_password_as_the_config_does() -> None:
    url = f"redis-cluster://u:{PASSWORD}@h1:7000,h2:7001"
    assert url_problem(url) is None
    assert parse_cluster_nodes(url) == ([("h1", 7000), ("h2", 7001)], "u", PASSWORD)
    assert mask_password("redis-cluster://secret@h1:7000") == "redis-cluster://***@h1:7000"
    assert "only database 0" in (url_problem("redis-cluster://h1:7000/2") or "")
    assert url_problem("redis-cluster://h1:7000/0") is None


def test_a_password_in_the_query_string_is_masked() -> None:
    """redis-py reads ``?password=`` too (its documented ``unix://`` form): /health, logs and the
    effective config show the URL, so that password is masked like one before the ``@``."""
    url = "unix:///run/redis.sock?db=0&password=s3cret&x=1"
    assert url_problem(url) is None
    assert mask_password(url) == "unix:///run/redis.sock?db=0&password=***&x=1"
    assert mask_password("redis://u:pw@h:6379/0?password=s3cret") == "redis://u:***@h:6379/0?password=***"
    assert mask_password("redis://h:6379/0?db=1") == "redis://h:6379/0?db=1"


def test_all_connections_busy_is_a_wait_not_an_outage(redis_server) -> None:  # type: ignore[no-untyped-def]
    """Callers beyond the pool's connections wait for one; redis-py would raise "Too many
    connections", which the tier took for the server being down (every call a miss meanwhile)."""
    store = RemoteStore(redis_server.url, max_connections=1)
    assert store.put_many([item(1), item(2)]) == 2
    other: list[list[FetchStatus]] = []
    second = threading.Thread(target=lambda: other.append(store.fetch_into(NS, [key(2)], into_buffers([]))))

    def sink_holding_the_connection(index: int, payload_len: int, num_tokens: int) -> memoryview:
        second.start()  # needs the one connection, which this fetch holds until its sink returns
        second.join(2)
        return memoryview(bytearray(payload_len))

    assert store.fetch_into(NS, [key(1)], sink_holding_the_connection) == [FetchStatus.OK]
    second.join()
    assert other == [[FetchStatus.OK]]
    assert store.status().failures == 0 and store.available()
    store.close()


def test_a_full_server_pauses_writes_and_keeps_serving_reads(own_redis) -> None:  # type: ignore[no-untyped-def]
    server = own_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    store = RemoteStore(server.url)
    assert store.put_many([item(0)]) == 1
    i = 1
    while store.put_many([item(i)]) is not None:  # until the server answers -OOM
        i += 1
        assert i < 10_000, "the server never became full"
    assert not store.accepts_writes()  # new chunks are not queued for it meanwhile
    assert store.available() and store.status().healthy
    assert store.exists_many(NS, [key(0)]) == [True]
    got: list[bytearray] = []
    assert store.fetch_into(NS, [key(0)], into_buffers(got)) == [FetchStatus.OK]
    assert bytes(got[0]) == bytes(item(0)[2][1])
    store.close()


def test_a_trickled_reply_is_bounded_by_the_timeout_and_its_connection_dropped() -> None:
    """A reply that keeps coming a byte at a time: each receive is in time, the whole never is."""
    dropped = threading.Event()

    def trickle(conn: socket.socket, args: list[bytes]) -> None:
        conn.sendall(b"*1\r\n$10000000\r\n")
        try:
            while not fake.stopped.is_set():
                conn.sendall(b"x")
                fake.stopped.wait(0.02)
        except OSError:  # the client closed the connection
            dropped.set()
            raise

    fake = FakeResp(trickle)
    store = RemoteStore(fake.url, timeout_s=0.5)
    result: list[list[FetchStatus]] = []
    fetch = threading.Thread(target=lambda: result.append(store.fetch_into(NS, [key(1)], into_buffers([]))))
    fetch.start()
    fetch.join(60)  # unbounded before: it ran as long as the server kept trickling
    finished = not fetch.is_alive()
    closed = dropped.wait(30)  # the connection with a reply in flight is closed, never reused
    fake.close()
    assert finished and result == [[FetchStatus.MISSING]]
    assert closed and store.status().failures == 1
    store.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"-LOADING Redis is loading the dataset in memory\r\n",
        b"-MOVED 3999 127.0.0.1:6381\r\n",
        b"-NOAUTH Authentication required.\r\n",
        b"*2\r\n$-1\r\n",  # fewer values than keys, then nothing
    ],
)
def test_an_error_or_short_reply_to_a_fetch_is_a_miss_on_a_fresh_connection(reply: bytes) -> None:
    def answer(conn: socket.socket, args: list[bytes]) -> None:
        conn.sendall(reply if len(args) == 3 else b"*1\r\n$-1\r\n")

    fake = FakeResp(answer)
    store = RemoteStore(fake.url, timeout_s=0.5, backoff=_NoWait())
    assert store.fetch_into(NS, [key(1), key(2)], into_buffers([])) == [FetchStatus.MISSING] * 2
    assert store.status().failures == 1
    assert store.fetch_into(NS, [key(3)], into_buffers([])) == [FetchStatus.MISSING]
    assert fake.connections == 2  # the first connection, its reply in doubt, was not reused
    fake.close()
    store.close()


def test_fetches_speak_resp2_where_no_push_frame_can_come_before_a_reply() -> None:
    """Servers send RESP3 clients push frames (invalidations, maintenance notices) at any time; one
    before an ``MGET`` reply would fail the fetch. The tier asks for RESP2, which has none."""

    def answer(conn: socket.socket, args: list[bytes]) -> None:
        if fake.resp3:  # as a server may, to a RESP3 client
            conn.sendall(b">2\r\n$10\r\ninvalidate\r\n_\r\n")
        conn.sendall(b"*1\r\n$-1\r\n")

    fake = FakeResp(answer)
    store = RemoteStore(fake.url, timeout_s=0.5, backoff=_NoWait())
    assert store.fetch_into(NS, [key(1)], into_buffers([])) == [FetchStatus.MISSING]
    assert store.status().failures == 0 and fake.resp3 == 0
    fake.close()
    store.close()


class _NoWait:
    """A back-off that never waits (the probe right after a failure is the point of the test)."""

    initial_s = max_s = 1.0
    failures = 0

    def ready(self) -> bool:
        return True

    def failed(self) -> float:
        self.failures += 1
        return 0.0

    def succeeded(self) -> bool:
        return False

    def state(self):  # type: ignore[no-untyped-def]
        from lmcache.backoff import BackoffState

        return BackoffState(self.failures > 0, 0.0, 0.0, self.failures)
