"""The cache server as a real subprocess, with clients in this and other processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import msgspec
import pytest
import torch
from raw_lane import connect, exchange, read_frame, read_reply
from support.server_process import (
    CHUNK,
    CLIENT_PROC,
    MODEL,
    POOL_SHAPE,
    TPB,
    ServerProcess,
    shared_pool,
    subprocess_env,
    wait_until,
)

from lmcache.server import protocol as P
from lmcache.server.client import (
    BadPool,
    CacheServerClient,
    InvalidRequest,
    ServerUnavailable,
    UnknownInstance,
    VersionMismatch,
)
from lmcache.server.pool_sharing import PoolSharingError, share_cpu_pool
from lmcache.transfer import BlockTransfer


def _expected_pool(seed: int) -> torch.Tensor:
    return torch.randn(POOL_SHAPE, generator=torch.Generator().manual_seed(seed))


def _run_client_proc(url: str, seed: int, tokens: int, *, first: int = 0, wait: bool = False):  # type: ignore[no-untyped-def]
    cmd = [sys.executable, str(CLIENT_PROC), "--url", url, "--seed", str(seed), "--tokens", str(tokens)]
    cmd += ["--first", str(first)] + (["--wait"] if wait else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())


# ---- one server for the module ----------------------------------------------------------------------


def test_round_trip_shared_cpu_pool(client: CacheServerClient) -> None:
    pool = shared_pool(seed=1)
    src = pool[:8].clone()
    info = client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    assert info.chunk_size == CHUNK and info.num_blocks == POOL_SHAPE[0]
    tokens = list(range(1000, 1000 + 70))  # 2 full chunks of 32 + 6 tokens
    assert client.store(BlockTransfer(tokens, None, list(range(9)), 0, 70)) == 64  # the server read our pages
    assert client.lookup(tokens) == 64
    assert client.lookup(tokens, cache_salt="other-tenant") == 0
    pool[16:24].zero_()
    assert client.lookup(tokens, pin_id="req-1") == 64
    assert client.retrieve(BlockTransfer(tokens, None, list(range(16, 24)), 0, 64), pin_id="req-1") == 64
    assert torch.equal(pool[16:24], src)  # the server wrote into our pages
    # the only rank retrieved: pins released (right after the reply, so wait for it)
    wait_until(lambda: client.stats().pinned_lookups == 0, "the pins released")
    # only blocks at or after start are written
    pool[30:38].zero_()
    assert client.retrieve(BlockTransfer(tokens, None, list(range(30, 38)), 40, 64)) == 24
    assert pool[30:35].abs().sum() == 0 and torch.equal(pool[35:38], src[5:8])


def test_a_prompt_hashed_once_travels_as_chunk_hashes(client: CacheServerClient) -> None:
    pool = shared_pool(seed=11)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    tokens = list(range(7000, 7000 + 100))  # 3 full chunks of 32 + 4 tokens
    hashes = client.chunk_hashes(tokens, "tenant")
    assert hashes is not None and len(hashes.digests) == 3 * 32
    src = pool[:12].clone()
    # Stored by hashes (the prompt's tokens never sent), found and loaded by tokens, and the reverse.
    assert client.store(BlockTransfer(hashes, None, list(range(13)), 0, 100)) == 96
    assert client.lookup(tokens, "tenant") == 96
    assert client.lookup(tokens, chunk_hashes=hashes, pin_id="h") == 96
    pool[40:52].zero_()
    assert client.retrieve(BlockTransfer(hashes, None, list(range(40, 52)), 0, 96), pin_id="h") == 96
    assert torch.equal(pool[40:52], src)
    pool[40:52].zero_()
    assert client.retrieve(BlockTransfer(tokens, "tenant", list(range(40, 52)), 32, 96)) == 64
    assert torch.equal(pool[44:52], src[4:12]) and pool[40:44].abs().sum() == 0
    assert client.stats().pinned_lookups == 0


def test_a_token_prompt_ending_on_a_chunk_travels_as_its_chunk_hashes(client: CacheServerClient) -> None:
    """A store or load of token ids whose range ends on a chunk boundary sends the chunks' hashes (made
    here, a frame 64 times smaller, nothing for the server to hash); one ending inside a chunk sends the
    tokens (hashes name full chunks only). The same chunks are stored and found either way."""
    pool = shared_pool(seed=15)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    iid = client.instance_id
    assert iid is not None
    tokens = list(range(7500, 7500 + 100))  # 3 full chunks of 32 + 4 tokens
    hashes = client.chunk_hashes(tokens, "tenant")
    assert hashes is not None
    aligned = client.registrations.prompt_fields(iid, BlockTransfer(tokens, "tenant", list(range(13)), 0, 96))
    assert aligned == {"tokens": b"", "chunk_hashes": hashes.digests}
    unaligned = client.registrations.prompt_fields(
        iid, BlockTransfer(tokens, "tenant", list(range(13)), 0, 100)
    )
    assert unaligned == {"tokens": P.tokens_to_bytes(tokens), "cache_salt": "tenant"}
    src = pool[:12].clone()
    assert client.store(BlockTransfer(tokens, "tenant", list(range(13)), 0, 96)) == 96
    assert client.lookup(tokens, "tenant") == 96 and client.lookup(tokens, "other") == 0
    pool[40:52].zero_()
    assert client.retrieve(BlockTransfer(tokens, "tenant", list(range(40, 52)), 0, 96)) == 96
    assert torch.equal(pool[40:52], src)


def test_bad_chunk_hashes_get_clear_errors_and_change_nothing(client: CacheServerClient) -> None:
    pool = shared_pool(seed=12)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    tokens = list(range(8000, 8064))
    hashes = client.chunk_hashes(tokens)
    assert hashes is not None
    assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
    before = pool.clone()
    with pytest.raises(InvalidRequest, match="whole number of 32-byte digests"):
        client.retrieve(
            BlockTransfer(replace(hashes, digests=hashes.digests[:40]), None, list(range(30, 38)), 0, 64)
        )
    with pytest.raises(InvalidRequest, match=r"1 chunk hashes cover 32 tokens; .* up to token 64"):
        client.retrieve(
            BlockTransfer(replace(hashes, digests=hashes.digests[:32]), None, list(range(30, 38)), 0, 64)
        )
    iid = client.instance_id
    assert iid is not None
    both = P.Store(instance_id=iid, tokens=P.tokens_to_bytes(tokens), block_ids=list(range(8)), end=64)
    both.chunk_hashes = hashes.digests
    with pytest.raises(InvalidRequest, match="either as tokens .* or as chunk_hashes"):
        client.call(both, int)
    assert torch.equal(pool, before)
    assert client.lookup(tokens) == 64  # still served, still cached


def test_hashes_of_another_key_scheme_are_never_used(client: CacheServerClient) -> None:
    """Hashes made for one instance (its layout is in the key) are not sent for another: that call
    hashes the tokens again for its own instance, so its chunks get the keys of its own layout."""
    pool = shared_pool(seed=13)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    first = client.instance_id
    other = shared_pool(seed=14)[:, :1].clone()  # one layer per row: another layout
    other.share_memory_()
    client.register(other, 0, 1, MODEL, TPB, pool_sharing="export")
    assert first is not None and client.instance_id != first
    tokens = list(range(9000, 9064))
    hashes = client.chunk_hashes(tokens, instance_id=first)
    assert hashes is not None and hashes != client.chunk_hashes(tokens)
    assert client.store(BlockTransfer(hashes, None, list(range(8)), 0, 64)) == 64  # hashed again
    assert client.lookup(tokens) == 64
    assert client.lookup(tokens, instance_id=first) == 0  # nothing stored under the first layout's keys
    other[20:28].zero_()
    assert client.retrieve(BlockTransfer(hashes, None, list(range(20, 28)), 0, 64)) == 64
    assert torch.equal(other[20:28], other[:8])


def test_store_from_numpy_bytes_and_tensor_inputs(client: CacheServerClient) -> None:
    pool = shared_pool(seed=2)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    tokens = torch.arange(5000, 5064)
    assert client.store(BlockTransfer(tokens, None, torch.arange(8), 0, 64)) == 64
    assert client.lookup(P.tokens_to_bytes(tokens)) == 64


def test_invalid_requests_get_clear_errors_and_server_keeps_serving(client: CacheServerClient) -> None:
    pool = shared_pool(seed=3)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    tokens = list(range(64))
    with pytest.raises(InvalidRequest, match=r"block ids must be in \[0, 64\)"):
        client.store(BlockTransfer(tokens, None, [0, 1, 2, 3, 4, 5, 6, 999], 0, 64))
    with pytest.raises(InvalidRequest, match="within the request's 64 tokens"):
        client.store(BlockTransfer(tokens, None, list(range(8)), 0, 65))
    with pytest.raises(InvalidRequest, match="multiple of chunk_size"):
        client.store(BlockTransfer(tokens, None, list(range(8)), 5, 64))
    with pytest.raises(UnknownInstance, match="register the pool again"):
        client.lookup(tokens, instance_id=12345)
    with pytest.raises(InvalidRequest, match="rank 3 is not below world_size 2"):
        client.register(pool, 3, 2, MODEL, TPB, pool_sharing="export")
    with pytest.raises(BadPool, match="chunk_size=32 must be a multiple of tokens_per_block=64"):
        client.register(pool, 0, 1, MODEL, 64, pool_sharing="export")
    assert client.ping().protocol_version == P.PROTOCOL_VERSION
    assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) in (0, 64)


def test_unshared_cpu_pool_is_refused_at_registration(client: CacheServerClient) -> None:
    with pytest.raises(PoolSharingError, match=r"call pool.share_memory_\(\)"):
        client.register(torch.zeros(POOL_SHAPE), 0, 1, MODEL, TPB, pool_sharing="export")


def test_bad_descriptor_gets_bad_pool_error(client: CacheServerClient) -> None:
    pool = shared_pool()
    desc = share_cpu_pool(pool)
    with pytest.raises(BadPool, match="named shared memory cannot be used"):
        client.register(msgspec.structs.replace(desc, fd=987_654), 0, 1, MODEL, TPB, pool_sharing="export")
    with pytest.raises(BadPool, match="does not fit"):
        client.register(
            msgspec.structs.replace(desc, shape=[6400, 2, 2, 128]), 0, 1, MODEL, TPB, pool_sharing="export"
        )
    with pytest.raises(BadPool, match="unsupported pool dtype"):
        client.register(
            msgspec.structs.replace(desc, dtype="complex32"), 0, 1, MODEL, TPB, pool_sharing="export"
        )
    cuda = P.CudaIpcPool(
        shape=list(POOL_SHAPE),
        dtype="float32",
        ipc_handle=b"\1" * 64,
        alloc_bytes=1 << 24,
        device_uuid="ab" * 16,
    )
    with pytest.raises(BadPool):
        client.register(cuda, 0, 1, MODEL, TPB, pool_sharing="export")
    assert client.ping().server_id


def test_version_mismatch_gets_clear_error(server: ServerProcess) -> None:
    reply = exchange(server.ipc_url, msgspec.msgpack.encode({"v": 99, "rid": 17, "op": "ping"}))
    assert not reply.ok and reply.rid == 17
    assert reply.error is not None and reply.error.code == "version_mismatch"
    assert "v=99" in reply.error.message and f"v={P.PROTOCOL_VERSION}" in reply.error.message


def test_client_side_version_check(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    client = CacheServerClient(server.ipc_url, timeout_s=20.0)
    try:
        server_version = P.PROTOCOL_VERSION
        # the client now claims the next version in what it checks
        monkeypatch.setattr(P, "PROTOCOL_VERSION", server_version + 1)
        with pytest.raises(VersionMismatch, match=f"v{server_version}"):
            client.ping()
    finally:
        monkeypatch.undo()
        client.close()


def test_malformed_oversized_and_unknown_op_frames(server: ServerProcess) -> None:
    cases = {
        b"\x93\x01\x02": "malformed",
        msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 3, "op": "drop_tables"}): "unknown_op",
        msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 3, "op": "ping"})
        + b"x" * (1 << 21): "too_large",
    }
    for frame, code in cases.items():
        reply = exchange(server.tcp_url, frame)
        assert not reply.ok and reply.error is not None and reply.error.code == code, reply
    with connect(server.tcp_url) as sock:  # announces more than the hard cap: told why, then closed
        sock.sendall(P.FRAME_HEADER.pack(1 << 31))
        reply = read_reply(sock)
        assert reply.rid == -1 and reply.error is not None and reply.error.code == "too_large"
        assert "--max-frame-mb" in reply.error.message
        assert read_frame(sock) is None


def test_concurrent_threads_share_one_client(client: CacheServerClient) -> None:
    pool = shared_pool(seed=5)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            tokens = list(range(100_000 * (i + 1), 100_000 * (i + 1) + 32))
            assert (
                client.store(BlockTransfer(tokens, None, [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], 0, 32))
                == 32
            )
            for _ in range(10):
                assert client.lookup(tokens) == 32
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_tensor_parallel_world_lookup_needs_every_rank_and_pins_last_until_all_retrieved(
    server: ServerProcess,
) -> None:
    pools = [shared_pool(seed=10 + r) for r in range(2)]
    clients = [CacheServerClient(server.ipc_url, timeout_s=20.0) for _ in range(2)]
    try:
        for r in range(2):
            clients[r].register(pools[r], r, 2, MODEL + "-tp2", TPB, pool_sharing="export")
        tokens = list(range(7000, 7064))
        clients[0].store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
        assert clients[0].lookup(tokens) == 0  # rank 1 has not stored yet
        clients[1].store(BlockTransfer(tokens, None, list(range(8)), 0, 64))
        owner = clients[0].instance_id
        assert clients[0].lookup(tokens, pin_id=42) == 64
        assert clients[0].stats().pinned_lookups == 1
        src = [p[:8].clone() for p in pools]
        assert clients[0].retrieve(BlockTransfer(tokens, None, list(range(20, 28)), 0, 64), pin_id=42) == 64
        assert clients[0].stats().pinned_lookups == 1  # rank 1 still to load
        assert (
            clients[1].retrieve(
                BlockTransfer(tokens, None, list(range(20, 28)), 0, 64), pin_id=42, pin_owner=owner
            )
            == 64
        )
        # Released right after rank 1's reply went out: seen at once by rank 1, soon by others.
        assert clients[1].stats().pinned_lookups == 0
        assert clients[0].stats().pinned_lookups == 0
        for r in range(2):
            assert torch.equal(pools[r][20:28], src[r])
        assert clients[0].lookup(tokens, pin_id=43) == 64
        assert clients[0].release(43) is True
        assert clients[0].stats().pinned_lookups == 0
    finally:
        for c in clients:
            c.close()


def test_two_client_processes_share_one_server(server: ServerProcess, client: CacheServerClient) -> None:
    proc = _run_client_proc(server.tcp_url, seed=21, tokens=64, first=20_000)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["stored"] == 64
    pool = shared_pool()
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    tokens = list(range(20_000, 20_064))
    assert client.lookup(tokens) == 64
    assert client.retrieve(BlockTransfer(tokens, None, list(range(40, 48)), 0, 64)) == 64
    assert torch.equal(pool[40:48], _expected_pool(21)[:8])


# ---- servers of their own ------------------------------------------------------------------------


def test_killed_client_is_reaped_and_its_chunks_stay(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--client-timeout-s", "1")
    proc = _run_client_proc(server.ipc_url, seed=31, tokens=64, first=30_000, wait=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        dead_id = json.loads(line)["instance_id"]
        with CacheServerClient(server.tcp_url, timeout_s=20.0) as watcher:
            assert any(i.instance_id == dead_id for i in watcher.stats().instances)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            stats = wait_until(
                lambda: (s := watcher.stats()).reaped_instances >= 1 and s,
                "the server to reap the killed client",
            )
            assert all(i.instance_id != dead_id for i in stats.instances)
            assert stats.pinned_lookups == 0
            pool = shared_pool()
            watcher.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
            tokens = list(range(30_000, 30_064))
            assert watcher.lookup(tokens) == 64
            assert watcher.retrieve(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
            assert torch.equal(pool[:8], _expected_pool(31)[:8])
            # an idle client that keeps heartbeating is not reaped
            time.sleep(2.5)
            assert any(i.instance_id == watcher.instance_id for i in watcher.stats().instances)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_server_restart_client_unavailable_then_reregisters(start_server, scheme: str) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    pool = shared_pool(seed=41)
    src = pool[:8].clone()
    tokens = list(range(40_000, 40_064))
    url = server.tcp_url if scheme == "tcp" else server.ipc_url
    client = CacheServerClient(url, timeout_s=2.0, heartbeat_interval_s=0.2)
    try:
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
        server.kill(signal.SIGKILL)
        with pytest.raises(ServerUnavailable):
            client.lookup(tokens)
        with pytest.raises(ServerUnavailable):  # fails at once while down, never hangs
            client.lookup(tokens)
        # a new server on the same port and ipc path (the old socket file is stale): the client's very
        # next call reaches it, although it was failing fast a moment ago
        start_server(port=server.port)
        assert client.lookup(tokens) == 0  # the new server's cache is empty
        assert client.reregistrations >= 1
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
        assert client.lookup(tokens, pin_id=1) == 64
        pool[50:58].zero_()
        assert client.retrieve(BlockTransfer(tokens, None, list(range(50, 58)), 0, 64), pin_id=1) == 64
        assert torch.equal(pool[50:58], src)
    finally:
        client.close()


def test_unreachable_server_raises_after_timeout(workdir) -> None:  # type: ignore[no-untyped-def]
    client = CacheServerClient(f"ipc://{workdir}/nobody.sock", timeout_s=0.3, heartbeat_interval_s=0)
    try:
        with pytest.raises(ServerUnavailable, match="is it running"):
            client.ping()
    finally:
        client.close()
