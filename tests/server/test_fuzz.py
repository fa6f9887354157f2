"""Fuzzing the server with raw frames: it must answer every one and lose nothing it cached."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_lane import connect, framed, read_frame
from support.server_process import MODEL, TPB, ServerProcess, shared_pool

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient
from lmcache.transfer import BlockTransfer

TOKENS = list(range(60_000, 60_064))
_SERVER: ServerProcess | None = None


@pytest.fixture(scope="module")
def fuzz_setup(
    server: ServerProcess,
) -> Iterator[tuple[CacheServerClient, torch.Tensor, torch.Tensor, socket.socket]]:
    global _SERVER
    _SERVER = server
    client = CacheServerClient(server.ipc_url, timeout_s=20.0)
    pool = shared_pool(seed=77)
    source = pool[:8].clone()
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
    assert client.store(BlockTransfer(TOKENS, None, list(range(8)), 0, 64)) == 64
    sock = connect(server.tcp_url)
    yield client, pool, source, sock
    sock.close()
    client.close()


def _valid_frames(instance_id: int) -> list[bytes]:
    """Well-formed requests to mutate (none that would legitimately drop the cache)."""
    tok = P.tokens_to_bytes(TOKENS)
    return [
        P.encode(P.Ping(rid=1)),
        P.encode(P.Stats(rid=2)),
        P.encode(P.Heartbeat(rid=3, instance_ids=[instance_id, 5])),
        P.encode(P.Lookup(rid=4, instance_id=instance_id, tokens=tok, cache_salt="s", pin_id=3)),
        P.encode(P.Lookup(rid=5, instance_id=instance_id, tokens=TOKENS[:40], pin_id="p")),
        P.encode(
            P.LookupHashes(rid=10, instance_id=instance_id, chunk_hashes=b"\7" * 64, num_tokens=70, pin_id=2)
        ),
        P.encode(P.Store(rid=6, instance_id=instance_id, tokens=tok, block_ids=list(range(8)), end=64)),
        P.encode(
            P.Retrieve(
                rid=7, instance_id=instance_id, tokens=tok, block_ids=list(range(8, 16)), end=64, pin_id=3
            )
        ),
        P.encode(
            P.Store(
                rid=11,
                instance_id=instance_id,
                tokens=b"",
                chunk_hashes=b"\5" * 64,
                block_ids=list(range(8)),
                end=64,
            )
        ),
        P.encode(
            P.Retrieve(
                rid=12,
                instance_id=instance_id,
                tokens=b"",
                chunk_hashes=b"\7" * 64,
                block_ids=list(range(8, 16)),
                end=64,
                pin_id=2,
            )
        ),
        P.encode(P.Release(rid=8, instance_id=instance_id, pin_id="p")),
        P.encode(
            P.Register(
                rid=9,
                instance_id=123,
                rank=0,
                world_size=1,
                model_name="fuzz",
                tokens_per_block=TPB,
                pool=P.CpuShmPool(
                    shape=[4, 2, 2, 128],
                    dtype="float32",
                    pid=4_194_999,
                    fd=3,
                    file_bytes=8192,
                    file_dev=1,
                    file_inode=2,
                ),
            )
        ),
    ]


def _exchange(sock: socket.socket, frame: bytes) -> P.Reply:
    sock.sendall(framed(frame))
    try:
        reply = read_frame(sock)
    except TimeoutError:
        reply = None
    if reply is None:
        log = _SERVER.log()[-4000:] if _SERVER is not None else ""
        raise AssertionError(f"the server did not answer the fuzzed frame {frame!r}; server log:\n{log}")
    return P.decode_reply(reply)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    frame = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(frame) - 1)))
        if action == "flip" and frame:
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and frame:
            del frame[pos : pos + draw(st.integers(1, 8))]
        elif action == "truncate":
            del frame[pos:]
    return bytes(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_frames_never_break_the_server(fuzz_setup, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    client, _pool, _source, sock = fuzz_setup
    seeds = _valid_frames(client.instance_id)
    frame = data.draw(
        st.one_of(
            st.binary(max_size=256),
            mutated(seeds),
            st.builds(
                lambda d: msgspec.msgpack.encode(d),
                st.dictionaries(
                    st.sampled_from(
                        [
                            "v",
                            "rid",
                            "op",
                            "instance_id",
                            "tokens",
                            "block_ids",
                            "end",
                            "pool",
                            "chunk_hashes",
                        ]
                    ),
                    st.one_of(
                        st.integers(-(2**63), 2**64 - 1),
                        st.text(max_size=8),
                        st.binary(max_size=16),
                        st.none(),
                    ),
                ),
            ),
        )
    )
    reply = _exchange(sock, frame)
    assert reply.ok or reply.error is not None


def test_server_healthy_and_data_intact_after_fuzzing(fuzz_setup) -> None:  # type: ignore[no-untyped-def]
    client, pool, source, _sock = fuzz_setup
    assert client.ping().protocol_version == P.PROTOCOL_VERSION
    pool[40:48].zero_()
    assert client.lookup(TOKENS) == 64
    assert client.retrieve(BlockTransfer(TOKENS, None, list(range(40, 48)), 0, 64)) == 64
    assert torch.equal(pool[40:48], source)
