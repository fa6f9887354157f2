import logging
import time
from pathlib import Path

import pytest
import redis
import torch
from redis.connection import PythonRespSerializer
from tier_helpers import (
    dropped_writes,
    load_all,
    make_engine,
    make_pool,
    run_tier_proc,
    space_of,
    store_all,
    tokens,
)

from lmcache.storage.remote_store import RemoteStore, parse_cluster_nodes, require_redis
from lmcache.storage.resp import Parts, ZeroCopyPacker
from lmcache.transfer import BlockTransfer


def client_for(server) -> redis.Redis:  # type: ignore[no-untyped-def]
    return redis.Redis(host="127.0.0.1", port=server.port)


def chunk_names(r: redis.Redis) -> list[bytes]:
    return sorted(r.keys("lmcache:*"))


def test_two_engines_share_through_redis(redis_server, tmp_path: Path) -> None:
    pool = make_pool(128)
    a = make_engine(tmp_path / "a", redis_server.url)
    p1, p2 = tokens(256), tokens(192, 70_000)
    store_all(a, pool, p1)
    store_all(a, pool, p2, first_block=16)
    assert a.tiers.flush()
    assert a.snapshot().tier("remote").writes == 7 and len(chunk_names(client_for(redis_server))) == 7
    assert a.l1.pinned_keys() == []

    b = make_engine(tmp_path / "b", redis_server.url)  # its own L1 and disk
    dst = list(range(64, 80))
    assert load_all(b, pool, p1, dst, pin="p1") == 256
    assert torch.equal(pool[dst], pool[:16])
    dst2 = list(range(90, 102))
    assert load_all(b, pool, p2, dst2, pin="p2") == 192
    assert torch.equal(pool[dst2], pool[16:28])
    assert b.tiers.flush()  # the fetched chunks are written behind to b's disk
    assert b.snapshot().tier("remote").hits == 7 and b.l1.pinned_keys() == []
    b.close()  # flushes the disk copies of what it fetched
    assert b.snapshot().tier("disk").chunks == 7

    # The fetched chunks were written behind to b's disk: served from there without Redis.
    c = make_engine(tmp_path / "b")
    dst3 = list(range(110, 126))
    assert load_all(c, pool, p1, dst3, pin=3) == 256
    assert torch.equal(pool[dst3], pool[:16])
    a.close()
    c.close()


def test_valkey_and_unix_socket_urls(redis_server) -> None:
    pool = make_pool(128)
    writer = make_engine(None, f"valkey://127.0.0.1:{redis_server.port}")
    store_all(writer, pool, tokens(128))
    writer.close()
    reader = make_engine(None, f"unix://{redis_server.unix_socket}")
    dst = list(range(64, 72))
    assert load_all(reader, pool, tokens(128), dst, pin=1) == 128
    assert torch.equal(pool[dst], pool[:8])
    reader.close()


def test_remote_only_engine_without_l1(redis_server) -> None:
    pool = make_pool(128)
    writer = make_engine(None, redis_server.url, local_cpu=False)
    assert writer.l1.arena.capacity_bytes > 0  # a staging area for the lower tiers
    store_all(writer, pool, tokens(128))
    writer.close()
    reader = make_engine(None, redis_server.url, local_cpu=False)
    dst = list(range(64, 72))
    assert load_all(reader, pool, tokens(128), dst, pin=1) == 128
    assert torch.equal(pool[dst], pool[:8])
    reader.close()


def test_writes_skip_chunks_already_in_redis(redis_server) -> None:
    pool = make_pool(128)
    with make_engine(None, redis_server.url) as a:
        store_all(a, pool, tokens(256))
    b = make_engine(None, redis_server.url)
    store_all(b, pool, tokens(256))  # b does not know they are there
    b.close()
    assert b.snapshot().tier("remote").writes == 0 and len(chunk_names(client_for(redis_server))) == 4


def test_lookup_checks_all_chunks_in_one_round_trip(redis_server, monkeypatch) -> None:
    pool = make_pool(128)
    with make_engine(None, redis_server.url) as a:
        store_all(a, pool, tokens(512))
    calls: list[tuple[str, int]] = []
    for name in ("exists_many", "fetch_into"):
        original = getattr(RemoteStore, name)

        def spy(self, ns, keys, *rest, _name=name, _original=original):  # type: ignore[no-untyped-def]
            calls.append((_name, len(keys)))
            return _original(self, ns, keys, *rest)

        monkeypatch.setattr(RemoteStore, name, spy)
    b = make_engine(None, redis_server.url)
    assert b.lookup(space_of(pool), tokens(640)) == 512
    assert calls == [("exists_many", 10), ("fetch_into", 8)]
    calls.clear()
    assert b.lookup(space_of(pool), tokens(640, 1_000_000)) == 0
    assert calls == [("exists_many", 10)]
    b.close()


def test_corrupt_or_misplaced_values_are_misses(redis_server, caplog) -> None:
    pool = make_pool(128)
    a = make_engine(None, redis_server.url)
    toks = tokens(256)
    store_all(a, pool, toks)
    a.close()
    r = client_for(redis_server)
    names = [
        RemoteStore.key_name(a.namespace(space_of(pool)), s.key)
        for s in a.chunk_spans(space_of(pool), 0, toks, None)
    ]
    value = bytearray(r.get(names[2]))
    value[-10] ^= 0x40  # a payload byte
    r.set(names[2], bytes(value))
    b = make_engine(None, redis_server.url)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert b.lookup(space_of(pool), toks) == 128
    assert r.exists(names[2]) == 0  # deleted
    assert b.snapshot().tier("remote").corrupt_chunks == 1
    assert any("corrupt" in rec.getMessage() for rec in caplog.records)
    # Another chunk's (valid) bytes under this key: the header names another key, so it is a miss.
    r.set(names[1], r.get(names[0]))
    c = make_engine(None, redis_server.url)
    assert c.lookup(space_of(pool), toks) == 64
    r.set(names[0], b"garbage")
    d = make_engine(None, redis_server.url)
    assert d.lookup(space_of(pool), toks) == 0
    for engine in (b, c, d):
        assert engine.l1.pinned_keys() == []
        engine.close()


def test_cluster_shares_across_engines_and_processes(redis_cluster, tmp_path: Path) -> None:
    pool = make_pool(128)
    a = make_engine(None, redis_cluster.url)
    toks = tokens(768)  # 12 chunks, spread over the masters
    store_all(a, pool, toks)
    assert a.tiers.flush()
    assert a.snapshot().tier("remote").writes == 12
    per_node = [int(n.cli("dbsize").strip()) for n in redis_cluster.nodes]
    assert sum(per_node) == 12 and sum(1 for n in per_node if n) >= 2
    a.close()

    args = {"remote_url": redis_cluster.url, "tokens": 768, "disk": str(tmp_path / "proc")}
    result = run_tier_proc("load", args)
    assert result["loaded"] == 768 and result["equal"], result
    assert result["hits"]["remote"] == 12

    b = make_engine(None, redis_cluster.url)
    dst = list(range(60, 108))
    assert load_all(b, pool, toks, dst, pin=1) == 768
    assert torch.equal(pool[dst], pool[:48])
    b.close()

    # A corrupt value on the cluster is a miss too (and is deleted).
    space = space_of(pool)
    fifth = RemoteStore.key_name(b.namespace(space), b.chunk_spans(space, 0, toks, None)[5].key)
    cluster = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    value = bytearray(cluster.get(fifth))
    value[200] ^= 1
    cluster.set(fifth, bytes(value))
    c = make_engine(None, redis_cluster.url)
    assert c.lookup(space, toks) == 5 * 64
    assert c.snapshot().tier("remote").corrupt_chunks == 1 and cluster.exists(fifth) == 0
    c.close()
    cluster.close()


def test_redis_down_degrades_then_recovers(own_redis, tmp_path: Path, caplog) -> None:
    server = own_redis()
    pool = make_pool(128)
    space = space_of(pool)
    a = make_engine(tmp_path / "a", server.url)
    b = make_engine(tmp_path / "b", server.url)
    p1 = tokens(256)
    store_all(a, pool, p1)
    assert a.tiers.flush()
    server.kill()
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for i in range(20):
            assert a.lookup(space, p1) == 256  # L1
            assert b.lookup(space, p1) == 0  # nothing local, remote down: a miss, not an error
            store_all(a, pool, tokens(64, 1_000 * (i + 1)), first_block=20)  # writes are dropped
        a.tiers.flush()
        a.clear()
        assert a.lookup(space, p1, pin_id="l2") == 256  # served from a's disk
        dst = list(range(64, 80))
        assert a.retrieve(space, 0, pool, BlockTransfer(p1, None, dst, 0, 256), pin_id="l2") == 256
        assert torch.equal(pool[dst], pool[:16])
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert 1 <= len(down) <= 2, [r.getMessage() for r in down]  # rate-limited: one per engine
    assert dropped_writes(a) >= 1

    server.start()  # back, empty (no persistence)
    p3 = tokens(192, 500_000)
    deadline = time.monotonic() + 30
    hit = 0
    while hit < 192 and time.monotonic() < deadline:
        a.l1.clear()
        store_all(a, pool, p3, first_block=30)  # stored again each round until a write lands
        a.tiers.flush()
        b.l1.clear()
        hit = b.lookup(space, p3)
        if hit < 192:
            time.sleep(0.05)
    assert hit == 192
    assert len(chunk_names(client_for(server))) >= 3
    for engine in (a, b):
        engine.close()
        assert engine.l1.pinned_keys() == []


def test_slow_redis_lookup_times_out_and_is_skipped(own_redis, caplog) -> None:
    server = own_redis()
    pool = make_pool(128)
    with make_engine(None, server.url) as a:
        store_all(a, pool, tokens(128))
    b = make_engine(None, server.url, lookup_timeout_ms=200)
    # The server stops answering, long enough that the lookup below surely starts while it is paused
    # (it cannot be unpaused early: CLIENT UNPAUSE would wait behind the pause too).
    server.cli("client", "pause", "6000", "ALL")
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert b.lookup(space_of(pool), tokens(128)) == 0
    assert any("Timeout" in r.getMessage() for r in caplog.records)
    deadline = time.monotonic() + 60
    while b.lookup(space_of(pool), tokens(128)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.lookup(space_of(pool), tokens(128)) == 128
    b.close()


def test_packer_matches_redis_py_and_sends_parts_unjoined() -> None:
    ours = ZeroCopyPacker()
    ref = PythonRespSerializer(6000, lambda v: v if isinstance(v, bytes) else str(v).encode())
    for args in (
        ("SET", b"k", b"v"),
        ("GET", "key"),
        ("MGET", b"a", b"b"),
        ("SET", b"k", b"x" * 10_000),
        ("EXPIRE", b"k", 5),
    ):
        assert b"".join(map(bytes, ours.pack(*args))) == b"".join(map(bytes, ref.pack(*args)))
    payload = memoryview(bytearray(b"p" * 20_000))
    out = ours.pack("SET", b"key", Parts([b"HEAD", payload]))
    assert any(item is payload or (isinstance(item, memoryview) and item.obj is payload.obj) for item in out)
    assert b"".join(map(bytes, out)) == b"".join(
        map(bytes, ref.pack("SET", b"key", b"HEAD" + bytes(payload)))
    )


def test_cluster_url_parsing() -> None:
    assert parse_cluster_nodes("redis-cluster://h1:7000,h2:7001") == (
        [("h1", 7000), ("h2", 7001)],
        None,
        None,
    )
    assert parse_cluster_nodes("redis-cluster://u:p%40ss@h1:7000") == ([("h1", 7000)], "u", "p@ss")
    with pytest.raises(ValueError, match="no host"):
        parse_cluster_nodes("redis-cluster://")


@pytest.mark.parametrize("scheme", ["redis", "redis-cluster"])
def test_server_down_at_startup_is_a_miss_not_an_error(scheme: str, caplog) -> None:
    from redis_servers import free_port

    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    pool = make_pool(128)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        engine = make_engine(None, url)
        for i in range(5):
            assert engine.lookup(space_of(pool), tokens(128, 7_000 * i)) == 0
            assert store_all(engine, pool, tokens(128, 7_000 * i)) == 128
        assert engine.lookup(space_of(pool), tokens(128)) == 128  # L1 serves
        engine.close()
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    assert engine.l1.pinned_keys() == []


def test_a_redis_package_too_old_for_our_reads_is_named_at_start_up() -> None:
    """Before 5.3 redis-py's ``get_connection`` needs a command name: every read would fail and the
    tier would look down at every read and up at every write."""
    with pytest.raises(ImportError, match=r"redis package is 5\.2\.1; it needs 5\.3 or newer.*--upgrade"):
        require_redis("5.2.1")
    require_redis("5.3.0")
    require_redis("8.1.0")
    require_redis()  # the installed one
